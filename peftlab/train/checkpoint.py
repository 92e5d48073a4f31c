"""Resumable checkpoints: written atomically, only from finite weights, read back only whole.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding the trainable parameters
(``trainable.safetensors``), the optimizer, scheduler and loss-scaler states
(``optimizer.pt``), each process's RNG states (``rng-<rank>.pt``) and the loop's position
(``trainer_state.json``: step, micro-batches consumed, token counts). It is written under a
``.tmp`` name and renamed into place (:func:`peftlab.core.fileio.replace_dir`), so a run
killed at any moment leaves either the
complete checkpoint or none: ``latest`` never returns a half-written one. A write that fails
(a full disk) removes the ``.tmp`` directory and raises one ``OSError`` naming the path.

Under FSDP (:mod:`peftlab.train.fsdp`) no process holds the whole of the trainable parameters
or the optimizer state, so they are written sharded instead: ``sharded/`` holds every
process's shards (``torch.distributed.checkpoint``: one file per process and ``.metadata``),
``optimizer.pt`` only the scheduler state and the number of processes (``fsdp_world``), which
a resume must match. The rest (RNG states, ``trainer_state.json``, the atomic rename, the
rules below) is the same.

Trust, in three rules:

* :func:`save` refuses weights that are not finite (:class:`NonFiniteWeights`), so no checkpoint
  ever holds inf or NaN.
* Weights that are finite can still be ruined (|w| ≈ 1e30 after one bad update). A checkpoint
  of step k is *confirmed* once the forward of step k + 1 gave a finite loss. While training,
  pruning keeps ``max(keep, 2)`` checkpoints, so a confirmed one survives a divergence right
  after a save; :func:`quarantine` sets the unconfirmed ones aside (``step-N.diverged``) and
  names the newest confirmed one. A finished run is pruned to ``keep``.
* :func:`read` loads a checkpoint whole into memory and checks it (every file parses, the step
  matches the name, every tensor is finite) before :func:`apply` touches the model, so a
  resume can fall back to an older checkpoint when the newest is damaged.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.fileio import replace_dir
from peftlab.train import fsdp, rundir

_NAME = re.compile(r"^step-(\d+)$")


class NonFiniteWeights(ValueError):
    """The trainable weights after optimizer step ``step`` hold inf or NaN."""

    def __init__(self, step: int, names: list[str]):
        self.step = step
        super().__init__(
            f"the weights after step {step} are not finite ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); no checkpoint was written from them"
        )


class Unreadable(ValueError):
    """A checkpoint whose files are missing, truncated or corrupt."""


def all_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints in ``run_dir``, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(done, reverse=True) if p.is_dir()]


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = all_checkpoints(run_dir)
    return found[0] if found else None


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once, which safetensors requires.
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def check_finite(model: nn.Module, step: int) -> None:
    """Raise :class:`NonFiniteWeights` unless every trainable weight is finite (under FSDP
    every process checks its shards and all agree)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = [not bool(torch.isfinite(fsdp.local(p.detach())).all()) for p in params.values()]
    if fsdp.is_sharded(model):
        bad = fsdp.any_process(bad)
    if any(bad):
        raise NonFiniteWeights(step, [n for n, b in zip(params, bad) if b])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    accelerator,
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the ``max(keep, 2)``
    newest (see the module docstring).

    Every process writes its RNG state; the main process writes the rest (with DDP the
    parameters and optimizer state are identical on every process).

    Raises:
        NonFiniteWeights: before anything is written (on every process: DDP weights agree).
        OSError: a write failed (a full disk); the ``.tmp`` directory is gone.
    """
    check_finite(model, step)
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if fsdp.is_sharded(model):  # every process writes its shards
            fsdp.save_sharded(model, optimizer, tmp / "sharded")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_main(tmp, final, model, optimizer, scheduler, state, accelerator)
    except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = _nbytes(trainable_state(model)) + _nbytes(optimizer.state_dict())
        raise rundir.write_error(final, e, needed, run_dir) from e
    if accelerator.is_main_process:
        prune(run_dir, max(keep, 2))
    accelerator.wait_for_everyone()
    return final


def _write_main(tmp: Path, final: Path, model, optimizer, scheduler, state, accelerator) -> None:
    extra = {"scheduler": scheduler.state_dict()}
    if fsdp.is_sharded(model):  # the weights and optimizer state are in sharded/
        extra["fsdp_world"] = accelerator.num_processes
    else:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        extra["optimizer"] = optimizer.state_dict()
    if accelerator.scaler is not None:
        extra["scaler"] = accelerator.scaler.state_dict()
    torch.save(extra, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    replace_dir(tmp, final)  # fsyncs every file before the rename makes it visible


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints."""
    for old in all_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def quarantine(run_dir: Path, bad_from: int, rename: bool = True) -> tuple[Path | None, list[Path]]:
    """After a divergence: set aside the checkpoints of step >= ``bad_from`` (no finite loss
    confirmed their weights) as ``step-N.diverged``, so that a resume skips them; only the main
    process passes ``rename``.

    Returns:
        The newest checkpoint before ``bad_from`` (confirmed good) or None, and the set-aside
        paths.
    """
    moved = []
    for ckpt in all_checkpoints(run_dir):
        if step_of(ckpt) >= bad_from:
            dest = ckpt.with_name(ckpt.name + ".diverged")
            if rename:
                shutil.rmtree(dest, ignore_errors=True)  # from an earlier divergence here
                ckpt.rename(dest)
            moved.append(dest)
    good = [c for c in all_checkpoints(run_dir) if step_of(c) < bad_from]
    return (good[0] if good else None), moved


@dataclasses.dataclass
class Saved:
    """A checkpoint read whole into memory (nothing applied yet)."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]  # optimizer, scheduler and (fp16) scaler states
    rng: dict
    state: dict  # the loop's position (trainer_state.json)


def read(path: Path, rank: int = 0) -> Saved:
    """Read and check every file of the checkpoint at ``path``.

    Raises:
        Unreadable: a file is missing or corrupt, the step disagrees with the name, or a
            tensor is not finite; the message says which.
    """
    path = Path(path)
    step = step_of(path)
    sharded = (path / "sharded").is_dir()
    try:
        tensors = {} if sharded else load_file(path / "trainable.safetensors")
        if sharded and not (path / "sharded" / ".metadata").is_file():
            raise FileNotFoundError(f"{path / 'sharded' / '.metadata'} is missing")
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = path / f"rng-{rank}.pt"
        # A resume with more processes than the run had: the new ones start from rank 0's RNG.
        rng = torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any failure to parse means "do not trust it"
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise Unreadable(f"{type(e).__name__}: {reason}") from None
    needs = {"fsdp_world", "scheduler"} if sharded else {"optimizer", "scheduler"}
    if not isinstance(extra, dict) or not needs <= set(extra):
        raise Unreadable("optimizer.pt lacks the optimizer or scheduler state")
    if not isinstance(state, dict) or state.get("step") != step:
        raise Unreadable(f"trainer_state.json says step {state.get('step')}, the name {step}")
    bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise Unreadable(f"non-finite weights in {bad[:3]}")
    return Saved(path, step, tensors, extra, rng, state)


def apply(saved: Saved, model: nn.Module, optimizer, scheduler, accelerator) -> dict:
    """Restore ``saved`` into the (unwrapped) ``model``, optimizer, scheduler and RNGs; returns
    the loop's position.

    The optimizer's learning rate is set from *this* run's schedule at the checkpoint's step
    (the same value when the schedule is unchanged): a finished run extended to more steps
    continues on the longer schedule instead of at the old schedule's last lr.

    Raises:
        ConfigError: the checkpoint's parameters (names, shapes) or optimizer groups do not
            fit the model, or FSDP shards of another number of processes; nothing in the run
            directory was touched.
        Unreadable: FSDP shards that cannot be read or are not finite (checked before the
            model is touched).
    """
    if "fsdp_world" in saved.extra or fsdp.is_sharded(model):
        _apply_sharded(saved, model, optimizer, accelerator)
    else:
        _apply_whole(saved, model, optimizer)
    scheduler.load_state_dict(saved.extra["scheduler"])
    groups = optimizer.param_groups
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)  # LambdaLR.get_lr's own expression
    scheduler._last_lr = [g["lr"] for g in groups]
    if "scaler" in saved.extra and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved.extra["scaler"])
    set_rng_state(saved.rng)
    return saved.state


def _apply_whole(saved: Saved, model: nn.Module, optimizer) -> None:
    """A one-process (or DDP) checkpoint: the trainable tensors and the optimizer state."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    tensors = saved.tensors
    wrong = sorted(n for n in expected & set(tensors) if tensors[n].shape != params[n].shape)
    if set(tensors) != expected or wrong:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        shapes = [f"{n} {tuple(tensors[n].shape)} vs {tuple(params[n].shape)}" for n in wrong[:2]]
        raise ConfigError(
            f"checkpoint {saved.path} does not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, shapes {shapes}; was the run's config.yaml (method, "
            f"method_args, model) changed?"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    try:
        optimizer.load_state_dict(saved.extra["optimizer"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"checkpoint {saved.path}: optimizer state does not fit: {e}") from None


def _apply_sharded(saved: Saved, model: nn.Module, optimizer, accelerator) -> None:
    """FSDP shards, on the number of processes that wrote them."""
    world = saved.extra.get("fsdp_world")
    if world is None or not fsdp.is_sharded(model):
        raise ConfigError(
            f"checkpoint {saved.path} was written by {'an FSDP' if world else 'an unsharded'} "
            f"run and cannot resume this one; distributed.strategy must stay as the run had it"
        )
    fsdp.check_world(world, accelerator.num_processes, saved.path)
    try:
        fsdp.load_sharded(saved.path / "sharded", model, optimizer)
    except ValueError as e:
        raise Unreadable(str(e)) from None


def load(path: Path, model: nn.Module, optimizer, scheduler, accelerator) -> dict:
    """Read and restore the checkpoint at ``path`` (:func:`read` then :func:`apply`)."""
    return apply(read(path, accelerator.process_index), model, optimizer, scheduler, accelerator)


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what a checkpoint needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0
