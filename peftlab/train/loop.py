"""The training loop and ``peftlab train``.

:func:`train` reads top to bottom: ``_accelerator`` and ``_prepare_output_dir`` (device,
mixed precision, run directory) → ``_setup`` (data, model, method, optimizer, schedule; a
``_Run``) → ``_loop`` (logging, periodic evaluation and checkpoints), whose ``_step`` is one
optimizer step (token-normalized loss over accumulated micro-batches and processes, clipping,
the divergence stop) → save the adapter → ``_summary``.
``accelerate`` places the model on the device, applies mixed precision and, under
``accelerate launch`` / ``torchrun``, wraps it in DistributedDataParallel.

Measurement (memory, time) wraps :func:`train` from outside; it can pass a model it loaded
itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import peftlab
from peftlab.core.config import ConfigError
from peftlab.data import DataError, collate, load_task_data
from peftlab.train import checkpoint, rundir
from peftlab.train.config import TrainConfig, apply_overrides
from peftlab.train.evaluate import evaluate, loss_sum

__all__ = ["TrainConfig", "TrainingDiverged", "train", "add_parser"]


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped."""


def train(
    config: TrainConfig | dict | str | Path,
    overrides: list[str] | None = None,
    model=None,
    tokenizer=None,
    resume: bool = False,
) -> dict:
    """Train as ``config`` says and return the run's summary (also written to summary.json).

    Args:
        config: a :class:`TrainConfig`, a dict of its keys, or a YAML path. With ``resume``,
            the run directory (its ``config.yaml`` is read) or a config whose output_dir holds
            the run.
        overrides: ``key=value`` strings applied on top (``method_args.r=8``).
        model, tokenizer: preloaded instead of loading ``config.model`` (the method is still
            applied here).
        resume: continue from the newest checkpoint in output_dir.

    Returns:
        ``output_dir``, ``steps``, ``final_loss``, ``eval_before``/``eval_after``, ``tokens``,
        ``loss_tokens``, ``truncated``, ``trainable_params``, ``wall_time`` and more.
    """
    from accelerate.utils import set_seed

    cfg = _resolve(config, overrides, resume)
    out = Path(cfg.output_dir)
    accelerator = _accelerator(cfg, out)
    ckpt = _prepare_output_dir(accelerator, cfg, out, resume)
    set_seed(cfg.seed)
    run = _setup(cfg, out, accelerator, model, tokenizer)
    if ckpt is not None:
        run.state.update(
            checkpoint.load(ckpt, run.unwrapped, run.optimizer, run.scheduler, accelerator)
        )
        accelerator.print(
            f"resuming {out} from {ckpt.name} (step {run.state['step']} of {run.total_steps})"
        )
    if cfg.tensorboard:
        accelerator.init_trackers(
            "tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()}
        )
    eval_before = (
        run.evaluate(0) if cfg.eval_before and run.state["step"] == 0 and cfg.eval_size else None
    )
    if accelerator.is_main_process:
        accelerator.print(
            f"{cfg.method} on {cfg.model}: {run.trainable:,} of {run.total:,} parameters train "
            f"({100 * run.trainable / run.total:.3f}%); {len(run.data.train)} training, "
            f"{len(run.data.validation)} validation, {len(run.data.test)} test examples"
            f"{' (labels ' + ', '.join(run.data.label_names) + ')' if run.data.label_names else ''}, "
            f"{run.data.truncated} truncated at max_length={cfg.max_length}; {run.total_steps} "
            f"steps of {run.global_batch * cfg.grad_accum} examples on "
            f"{accelerator.num_processes} process(es), {accelerator.device}"
        )
    loop = _loop(run)
    test = run.evaluate(run.state["step"], split="test") if run.data.test else None  # once

    if accelerator.is_main_process:
        rundir.save_adapter(run.unwrapped, out / "adapter")
    if eval_before is None:
        eval_before = (
            rundir.first_eval(out / "metrics.jsonl") if accelerator.is_main_process else None
        )
    summary = {**_summary(run, ckpt, eval_before, loop), "test": test}
    if accelerator.is_main_process:
        rundir.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    if cfg.tensorboard:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return summary


# ---- setup -----------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig, out: Path):
    """accelerate's Accelerator for this run, after the checks that need to know the device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; drop it (keeping the process group) so that a
    # second train() in the same process may use another mixed_precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU.
        cpu=_no_accelerator(),
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(out),
    )
    if cfg.tensorboard and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'")
    return accelerator


def _prepare_output_dir(accelerator, cfg: TrainConfig, out: Path, resume: bool) -> Path | None:
    """Check (or, with ``overwrite``, clear) the output directory and write the run's config;
    returns the checkpoint to resume from, if any. Files that another run wrote are never
    touched without ``overwrite``."""
    ckpt = checkpoint.latest(out) if resume else None
    if not resume:
        rundir.check_output_dir(out, cfg.overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        if not resume and cfg.overwrite:
            for name in rundir.RUN_FILES:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        rundir.truncate_metrics(out / "metrics.jsonl", _ckpt_step(ckpt))
        (out / "summary.json").unlink(missing_ok=True)
    return ckpt


@dataclasses.dataclass
class _Run:
    """Everything the training loop works with, built by :func:`_setup`."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    model: Any  # as accelerate prepared it (DistributedDataParallel under torchrun)
    unwrapped: Any  # the model itself
    tokenizer: Any
    data: Any
    optimizer: Any
    scheduler: Any
    global_batch: int  # examples per micro-batch across processes
    micro_per_epoch: int
    total_steps: int
    trainable: int
    total: int
    state: dict = dataclasses.field(
        default_factory=lambda: {
            "step": 0,
            "micro_batch": 0,
            "tokens": 0,
            "loss_tokens": 0,
            "wall_time": 0.0,
            "last_loss": None,
        }
    )
    _perms: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    def micro_batch(self, m: int) -> dict[str, torch.Tensor]:
        """This process's share of global micro-batch ``m``: a pure function of (seed, m), so
        a resumed run sees exactly the batches the interrupted one would have seen."""
        cfg = self.cfg
        epoch, pos = divmod(m, self.micro_per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            self._perms.clear()
            self._perms[epoch] = torch.randperm(len(self.data.train), generator=g).tolist()
        start = pos * self.global_batch + self.accelerator.process_index * cfg.batch_size
        chunk = [self.data.train[i] for i in self._perms[epoch][start : start + cfg.batch_size]]
        pad_id = self.tokenizer.pad_token_id
        return {k: v.to(self.accelerator.device) for k, v in collate(chunk, pad_id).items()}

    def evaluate(self, step: int, split: str = "validation") -> dict:
        """Evaluate on the validation (eval_ keys) or test (test_ keys) split, shared among
        processes, and log the metrics."""
        cfg, accelerator = self.cfg, self.accelerator
        exact = cfg.eval_exact_match if cfg.eval_exact_match is not None else cfg.data_is_builtin
        metrics = evaluate(
            self.unwrapped,
            self.tokenizer,
            self.data,
            cfg.eval_batch_size or cfg.batch_size,
            exact,
            accelerator.device,
            (accelerator.process_index, accelerator.num_processes),
            reduce=lambda xs: _reduce_sum(accelerator, xs),
            split=split,
        )
        rundir.log(accelerator, self.out, {"step": step, **metrics}, cfg.tensorboard)
        return metrics


def _setup(cfg: TrainConfig, out: Path, accelerator, model, tokenizer) -> _Run:
    """Load the tokenizer, data and model (unless given), apply the method, and build the
    optimizer and schedule."""
    from peftlab.models import load_model, load_tokenizer, model_kind

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kind = _kind(model) if model is not None else model_kind(cfg.model)
    data = load_task_data(tokenizer, cfg.data, kind, cfg.max_length, **cfg.data_kwargs())
    if model is None:
        model = load_model(cfg.model, kind, num_labels=max(2, len(data.label_names)))
    if getattr(model, "hf_quantizer", None) is None:  # quantize/adapt on the target device
        model.to(accelerator.device)
    method_config = cfg.method_config()
    if kind == "classification":
        method_config = _train_new_head(model, method_config)
    peftlab.apply(model, method_config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = peftlab.trainable_parameters(model)
    optimizer = _make_optimizer(model, cfg)

    global_batch = cfg.batch_size * accelerator.num_processes
    micro_per_epoch = len(data.train) // global_batch  # the last, partial micro-batch is dropped
    if micro_per_epoch == 0:
        raise DataError(
            f"batch_size={cfg.batch_size} × {accelerator.num_processes} process(es) = "
            f"{global_batch} exceeds the {len(data.train)} training examples; lower batch_size "
            f"or add data"
        )
    total_steps = (
        cfg.max_steps
        if cfg.max_steps is not None
        else max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    )
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, warmup, total_steps))
    # The scheduler is not given to prepare(): accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(
        cfg=cfg,
        out=out,
        accelerator=accelerator,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        tokenizer=tokenizer,
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        global_batch=global_batch,
        micro_per_epoch=micro_per_epoch,
        total_steps=total_steps,
        trainable=trainable,
        total=total,
    )


# ---- the loop --------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoopResult:
    eval_after: dict | None
    peak_memory: Any  # peftlab.bench.measure.PeakMemory
    model_bytes_at_start: int
    longest_batch: int  # the longest padded micro-batch: it sets the activation memory peak


def _loop(run: _Run) -> _LoopResult:
    """Train from ``run.state['step']`` to ``run.total_steps``: log, evaluate and checkpoint
    on schedule. The memory peak is the loop's own (evaluation and checkpoints included)."""
    from tqdm.auto import tqdm

    from peftlab.bench.measure import PeakMemory, tensor_bytes

    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    bar = tqdm(
        total=run.total_steps,
        initial=state["step"],
        disable=not (accelerator.is_main_process and cfg.progress),
        dynamic_ncols=True,
    )
    session_start = time.perf_counter()
    wall_before = state["wall_time"]
    run.model.train()
    longest, eval_after = 0, None
    model_bytes_at_start = tensor_bytes(run.unwrapped)["weights_bytes"]
    with PeakMemory(accelerator.device) as peak_memory:
        while state["step"] < run.total_steps:
            t0 = time.perf_counter()
            step = state["step"] + 1
            batches = [run.micro_batch(state["micro_batch"] + i) for i in range(cfg.grad_accum)]
            longest = max(longest, *(b["input_ids"].shape[1] for b in batches))
            loss, grad_norm, lr, tokens, loss_tokens = _step(run, step, batches)
            step_time = time.perf_counter() - t0
            state.update(
                step=step,
                micro_batch=state["micro_batch"] + cfg.grad_accum,
                last_loss=loss,
                tokens=state["tokens"] + tokens,
                loss_tokens=state["loss_tokens"] + loss_tokens,
                wall_time=wall_before + time.perf_counter() - session_start,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / step_time:.0f}")
            if step % cfg.log_every == 0 or step == run.total_steps:
                line = {
                    "step": step,
                    "epoch": round(state["micro_batch"] / run.micro_per_epoch, 4),
                    "loss": loss,
                    "lr": lr,
                    "tokens": tokens,
                    "loss_tokens": loss_tokens,
                    "step_time": step_time,
                    "tokens_per_s": tokens / step_time,
                }
                if grad_norm is not None:
                    line["grad_norm"] = grad_norm
                rundir.log(accelerator, run.out, line, cfg.tensorboard)
            if cfg.eval_size and (
                step == run.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            ):
                metrics = run.evaluate(step)
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                if step == run.total_steps:
                    eval_after = metrics
                run.model.train()
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint.save(
                    accelerator,
                    run.out,
                    step,
                    run.unwrapped,
                    run.optimizer,
                    run.scheduler,
                    state,
                    cfg.keep_checkpoints,
                )
        bar.close()
    return _LoopResult(eval_after, peak_memory, model_bytes_at_start, longest)


def _step(run: _Run, step: int, batches: list[dict]) -> tuple[float, float | None, float, int, int]:
    """One optimizer step over the micro-batches ``batches``; returns (loss, grad_norm, lr,
    tokens, loss_tokens), the counts summed over processes. Stops the run (before the
    update) if the loss or gradient norm is not finite."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    world = accelerator.num_processes
    # Normalize by the response tokens of the whole step, over every micro-batch and every
    # process, so grad_accum and DDP give the gradient of one big batch.
    local = [
        sum(_loss_count(b) for b in batches),
        sum(int(b["attention_mask"].sum()) for b in batches),
    ]
    loss_tokens, tokens = (int(x) for x in _reduce_sum(accelerator, local))
    scale = world / max(loss_tokens, 1)  # DDP averages gradients over processes
    loss_total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # all-reduce gradients once, after the last micro-batch
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            s, _ = loss_sum(model, batch)
            accelerator.backward(s * scale)
        loss_total += s.detach().float()
    loss = _reduce_sum(accelerator, [loss_total.item()])[0] / max(loss_tokens, 1)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    bad_norm = (
        grad_norm is not None and not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16"
    )
    if not math.isfinite(loss) or bad_norm:
        # fp16's loss scaler skips steps with inf gradients itself; anything else is fatal.
        _diverged(accelerator, run.out, cfg, step, loss, grad_norm, run.state)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return loss, grad_norm, lr, tokens, loss_tokens


def _summary(run: _Run, ckpt: Path | None, eval_before: dict | None, loop: _LoopResult) -> dict:
    cfg, state = run.cfg, run.state
    return {
        "status": "completed",
        "output_dir": str(run.out),
        "model": cfg.model,
        "method": cfg.method,
        "data": cfg.data,
        "steps": state["step"],
        "final_loss": state["last_loss"],
        "eval_before": eval_before,
        "eval_after": loop.eval_after,
        "tokens": state["tokens"],
        "loss_tokens": state["loss_tokens"],
        "train_examples": len(run.data.train),
        "validation_examples": len(run.data.validation),
        "test_examples": len(run.data.test),
        "label_names": run.data.label_names,
        "sources": run.data.sources,  # per source: weight and examples in each split
        "truncated": run.data.truncated,
        "dropped": run.data.dropped,
        "trainable_params": run.trainable,
        "total_params": run.total,
        "processes": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
        "wall_time": state["wall_time"],
        "resumed_from": ckpt.name if ckpt else None,
        # Peak over this session's training loop (evaluation and checkpointing included, setup
        # not): "bytes" is CUDA-allocated bytes or process RSS, "live_bytes" the CPU heap's
        # live bytes (peftlab.bench.measure.live_heap_bytes); see "how".
        "peak_memory": {
            **loop.peak_memory.to_dict(),
            # the model's own tensors (4-bit constants included) when the loop started
            "model_tensor_bytes": loop.model_bytes_at_start,
        },
        "longest_batch": loop.longest_batch,
    }


# ---- helpers ---------------------------------------------------------------------------------


def _resolve(config, overrides: list[str] | None, resume: bool) -> TrainConfig:
    """The run's config: from a TrainConfig, dict or YAML path (with ``--resume``, a run dir)."""
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    if isinstance(config, str | Path):
        path = Path(config)
        if resume and not path.exists():
            raise ConfigError(f"--resume {path}: no such run directory")
        if resume and path.is_dir():
            if not (path / "config.yaml").is_file():
                raise ConfigError(
                    f"--resume {path}: no config.yaml there, so it holds no peftlab run"
                )
            path = path / "config.yaml"
        cfg = TrainConfig.load(path, overrides)
    else:
        cfg = TrainConfig.from_dict(apply_overrides(config, overrides or []))
    return cfg


def _ckpt_step(ckpt: Path | None) -> int:
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def _reduce_sum(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def _no_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def _loss_count(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


def _kind(model) -> str:
    return (
        "classification"
        if type(model).__name__.endswith("ForSequenceClassification")
        else "causal-lm"
    )


def _train_new_head(model, method_config):
    """A classification head is new, so it must train even under a PEFT method: add it to
    ``modules_to_save`` unless the user chose those modules."""
    if method_config.modules_to_save is not None or not hasattr(method_config, "modules_to_save"):
        return method_config
    heads = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    return method_config.replace(modules_to_save=heads) if heads else method_config


def _make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters; matrices decay, vectors (biases, norms, DoRA
    magnitudes) do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    from peftlab.train.optim import make_optimizer  # torch AdamW or bitsandbytes 8-bit / paged

    return make_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay)


def _schedule(cfg: TrainConfig, warmup: int, total: int):
    """LR multiplier at optimizer step s (0-based): linear warmup, then cosine/linear decay."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = (
            0.5 * (1 + math.cos(math.pi * progress))
            if cfg.lr_schedule == "cosine"
            else 1 - progress
        )
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return factor


def _diverged(
    accelerator, out: Path, cfg: TrainConfig, step: int, loss: float, grad_norm, state: dict
):
    last = checkpoint.latest(out)
    msg = (
        f"loss={loss} (grad_norm={grad_norm}) at step {step}: training stopped before the update. "
        f"Nothing was overwritten: the last good checkpoint is "
        f"{last if last else 'none (no checkpoint written yet)'}, and {out / 'adapter'} was not "
        f"written. Lower lr (now {cfg.lr}), keep max_grad_norm set, or use mixed_precision=no/bf16."
    )
    if accelerator.is_main_process:
        summary = {
            "status": "diverged",
            "error": msg,
            "output_dir": str(out),
            "steps": state["step"],
            "final_loss": state["last_loss"],
            "method": cfg.method,
            "model": cfg.model,
        }
        rundir.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    raise TrainingDiverged(msg)


# ---- CLI -------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a method on a model from a YAML config",
        description="Train from CONFIG.yaml with key=value overrides (dotted keys reach into "
        "method_args: method_args.r=8), or continue a run with --resume OUTPUT_DIR.",
    )
    p.add_argument("config", nargs="?", help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    p.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        help="continue the run in OUTPUT_DIR from its newest checkpoint",
    )
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        if args.config:  # `train --resume DIR k=v`: argparse put the first override in `config`
            overrides.insert(0, args.config)
        source = args.resume
    elif args.config:
        source = args.config
    else:
        raise ConfigError("give a config file (peftlab train CONFIG.yaml) or --resume OUTPUT_DIR")
    try:
        summary = train(source, overrides, resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"peftlab train: {e}", flush=True)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
        keys = ("output_dir", "steps", "final_loss", "eval_before", "eval_after", "test")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0
