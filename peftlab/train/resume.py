"""Resuming a run: where, what may change, finished runs, and checking before touching.

``peftlab train --resume DIR`` continues the run in ``DIR`` itself, wherever it is now: a
moved or copied run directory continues where it lies, whatever the current directory (the
``output_dir`` in ``DIR/config.yaml`` is only a record, rewritten to ``DIR``).

**What may change** (:data:`MAY_CHANGE`): the length (``max_steps`` or ``epochs``) and what
does not alter the training itself — evaluation, checkpoint and logging frequency, how many
checkpoints are kept, progress display, TensorBoard, gradient checkpointing. Everything else
(``lr`` and its schedule, ``method``, ``method_args``, ``data``, ``seed``, ``batch_size``, ...)
would make the resumed steps belong to another run than the checkpoint's and is refused, in one
line listing what may change. ``config.yaml`` records the config actually used.

**A finished run** (summary.json ``status: completed``) is never silently restarted: a plain
``--resume`` says it is finished. A longer ``max_steps`` (or ``epochs``) extends it from its
last checkpoint (a run with ``save_every > 0`` writes one at its final step; without any
checkpoint an extension is refused). The learning-rate schedule, warmup included, is
recomputed for the new total as if the run had been planned that long: step s + 1 runs at
``lr · f(s)`` of the new schedule. Steps already done keep the rates they ran at, so under a
decaying schedule the rate rises from where the old schedule ended to the new schedule's value
at s, then decays to ``min_lr_ratio · lr`` at the new end; it never runs a step at the old
schedule's final rate.

**Checking before touching.** :func:`resolve` reads the recorded config and applies the
overrides (refusing what may not change, and a finished run with no extension) before the
lock is taken; :func:`restore`, after the model is built, checks the extension's length, reads
the newest checkpoint whole and checks it fits the model (falling back to an older one when the
newest is unreadable, saying so) and applies it. Only then does the trainer write to ``DIR``
(config.yaml, the metrics cut back to the checkpoint's step, summary.json removed), so a
refused resume leaves the directory exactly as it was.

**Several processes.** A DDP run may resume on another number of processes (the new ones start
from rank 0's RNG state; the global batch changes with it). An FSDP run's checkpoint holds one
shard per process and resumes only on as many processes as wrote it: any other number is
refused in one line naming both (:func:`peftlab.train.fsdp.check_world`). Its shards are read
and checked (finite, on every process) when they are applied, and an unreadable one falls back
to an older checkpoint like any other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from peftlab.core.config import ConfigError
from peftlab.train import checkpoint
from peftlab.train.config import TrainConfig, apply_overrides

MAY_CHANGE = (
    "max_steps",
    "epochs",
    "eval_every",
    "eval_before",
    "eval_test",
    "eval_exact_match",
    "eval_batch_size",
    "answer_extractor",
    "metric",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "tensorboard",
    "gradient_checkpointing",
)
"""Config keys a resume may change; the rest must stay as the run recorded them."""


LEGACY = {"head_lr": None, "pooling": "cls"}
"""Keys added after runs were recorded without them, and the value that reproduces what such
a run did (its head trained at lr; its classifier read the [CLS] pooler)."""


def resolve(config, overrides: list[str] | None) -> TrainConfig:
    """The config a resume runs with: the run's recorded config.yaml with ``overrides``.

    Args:
        config: the run directory; or a YAML path, dict or :class:`TrainConfig` whose
            ``output_dir`` is the run directory (it must agree with the recorded config but
            for :data:`MAY_CHANGE`).
        overrides: ``key=value`` strings; a new ``max_steps`` clears ``epochs`` and vice versa.

    Raises:
        ConfigError: no run there, a key that may not change, or a finished run with no
            extension asked for. Nothing is written.
    """
    overrides = _length_pairs(list(overrides or []))
    explicit = {o.split("=", 1)[0].strip() for o in overrides}  # keys the user set
    if isinstance(config, dict):
        explicit |= set(config)
    elif isinstance(config, str | Path) and Path(config).is_file():
        explicit |= set(yaml.safe_load(Path(config).read_text()) or {})
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    if isinstance(config, str | Path) and not Path(config).is_file():
        run_dir = Path(config)
        if not run_dir.exists():
            raise ConfigError(f"--resume {run_dir}: no such run directory")
        recorded = _recorded(run_dir)
        requested = _valid(apply_overrides(recorded, overrides), "the overrides")
    else:
        if isinstance(config, str | Path):
            requested = TrainConfig.load(config, overrides).to_dict()
        else:
            requested = _valid(apply_overrides(config, overrides), "the config")
        run_dir = Path(requested["output_dir"])
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: output_dir={str(run_dir)!r} is not a run directory")
        recorded = _recorded(run_dir)
        recorded["output_dir"] = requested["output_dir"]
    for key, then in LEGACY.items():  # a key newer than the run: the behaviour it ran with
        if key not in recorded:
            recorded[key] = then
            if key not in explicit:  # set by the user: refused below as a change if it is one
                requested[key] = then
    rec = _valid(recorded, str(run_dir / "config.yaml"))
    refused = [k for k in requested if requested[k] != rec[k] and k not in MAY_CHANGE]
    if refused:
        changes = ", ".join(f"{k}={requested[k]!r} (the run has {rec[k]!r})" for k in refused)
        hint = " (it continues in the run directory itself)" if "output_dir" in refused else ""
        raise ConfigError(
            f"--resume {run_dir}: {changes} cannot change on resume{hint}; only "
            f"{', '.join(MAY_CHANGE)} may. Start a new run to change the rest"
        )
    done = finished_steps(run_dir)
    same_length = (requested["max_steps"], requested["epochs"]) == (rec["max_steps"], rec["epochs"])
    if done is not None and same_length:
        raise ConfigError(
            f"--resume {run_dir}: the run is finished ({done} steps, summary.json status "
            f"completed); to train it further pass max_steps=N with N > {done} (or a larger "
            f"epochs), or start a new run"
        )
    requested["output_dir"] = str(run_dir)
    return TrainConfig.from_dict(requested)


def finished_steps(run_dir: Path) -> int | None:
    """The steps of a completed run (its summary.json says so), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and summary.get("status") == "completed":
        return int(summary.get("steps") or 0)
    return None


def restore(run) -> Path | None:
    """Load the newest intact checkpoint of ``run.out`` into ``run`` (model, optimizer,
    schedule, RNG, loop position); returns it, or None to start from step 0.

    Raises:
        ConfigError: the length does not extend a finished run, is shorter than the steps
            done, the checkpoints do not fit the model, or none of them is readable. Nothing
            is written.
    """
    out, acc = run.out, run.accelerator
    done = finished_steps(out)
    if done is not None and run.total_steps <= done:
        raise ConfigError(
            f"--resume {out}: the run is finished at step {done}; {_length(run.cfg)} gives "
            f"{run.total_steps} steps, which does not extend it. Pass max_steps=N with N > {done}"
        )
    unreadable = []
    for ckpt in checkpoint.all_checkpoints(out):
        try:
            saved = checkpoint.read(ckpt, acc.process_index)
            if saved.step <= run.total_steps:  # FSDP shards are read and checked in apply
                restored = checkpoint.apply(saved, run.unwrapped, run.optimizer, run.scheduler, acc)
        except checkpoint.Unreadable as e:
            unreadable.append(ckpt.name)
            _note(acc, f"checkpoint {ckpt} is unreadable ({e}); trying an older one")
            continue
        if saved.step > run.total_steps:
            raise ConfigError(
                f"--resume {out}: {_length(run.cfg)} gives {run.total_steps} steps, fewer than "
                f"the {saved.step} the run has done ({ckpt.name}); pass a larger max_steps"
            )
        run.state.update(restored)
        if unreadable:
            _note(acc, f"resuming from {ckpt.name}, the newest intact checkpoint")
        if done is not None and saved.step < done:
            _note(acc, f"extending from {ckpt.name}: steps {saved.step + 1}-{done} run again")
        acc.print(f"resuming {out} from {ckpt.name} (step {saved.step} of {run.total_steps})")
        return ckpt
    if unreadable:
        raise ConfigError(
            f"--resume {out}: no intact checkpoint ({', '.join(unreadable)} unreadable); start "
            f"over with overwrite=true, or restore a checkpoint"
        )
    if done is not None:
        raise ConfigError(
            f"--resume {out}: the finished run holds no checkpoint (it ran with save_every=0), "
            f"so it cannot be extended; start a new run with max_steps={run.total_steps}"
        )
    acc.print(f"resuming {out}: no checkpoint yet, so from step 0")
    return None


def end_of_training(run) -> None:
    """After the last step: the weights must be finite (else the run diverged); with
    ``save_every`` the last step gets a checkpoint (an extension resumes from it), and the
    checkpoints are pruned to ``keep_checkpoints``.

    Raises:
        checkpoint.NonFiniteWeights: the last update left inf or NaN.
    """
    cfg, acc, step = run.cfg, run.accelerator, run.state["step"]
    checkpoint.check_finite(run.unwrapped, step)
    if not cfg.save_every:
        return
    last = checkpoint.latest(run.out)
    if last is None or checkpoint.step_of(last) != step:
        checkpoint.save(
            acc,
            run.out,
            step,
            run.unwrapped,
            run.optimizer,
            run.scheduler,
            run.state,
            cfg.keep_checkpoints,
        )
    if acc.is_main_process:
        checkpoint.prune(run.out, cfg.keep_checkpoints)


def _recorded(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there, so it holds no peftlab run")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not readable YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a run's config must be a mapping, got {type(d).__name__}")
    return d


def _valid(d: dict, where: str) -> dict:
    """``d`` as TrainConfig validates and completes it (defaults filled in)."""
    try:
        return TrainConfig.from_dict(d).to_dict()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _length_pairs(overrides: list[str]) -> list[str]:
    """A run is as long as max_steps or epochs says: setting one clears the other."""
    keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    if "max_steps" in keys and "epochs" not in keys:
        overrides.append("epochs=null")
    if "epochs" in keys and "max_steps" not in keys:
        overrides.append("max_steps=null")
    return overrides


def _length(cfg: TrainConfig) -> str:
    return f"max_steps={cfg.max_steps}" if cfg.max_steps is not None else f"epochs={cfg.epochs}"


def _note(acc, msg: str) -> None:
    if acc.is_main_process:
        print(f"peftlab train: {msg}", file=sys.stderr, flush=True)
