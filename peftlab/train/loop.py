"""The training loop (the ``peftlab train`` command is :mod:`peftlab.cli.train`).

:func:`train` reads top to bottom: ``make_accelerator`` (device, mixed precision;
:mod:`peftlab.train.distributed`) and the run directory's lock → ``_setup`` (data, model,
method, optimizer, schedule; a ``_Run``) → the checkpoint a resume continues from, then
``_prepare_output_dir`` (nothing is written before everything is checked;
:mod:`peftlab.train.resume`) → ``_loop`` (logging, periodic evaluation and checkpoints), whose
``_step`` is one optimizer step (token-normalized loss over accumulated micro-batches and
processes, clipping, the divergence stop of :mod:`peftlab.train.divergence`) → save the
adapter → ``_summary``. ``accelerate`` places the model on the device, applies mixed precision
and, under ``accelerate launch`` / ``torchrun``, wraps it in DistributedDataParallel.

Measurement (memory, time) wraps :func:`train` from outside: it passes
:class:`~peftlab.train.callbacks.TrainCallback` hooks, which receive the model before the first
step and a :class:`~peftlab.train.callbacks.StepRecord` after every step, and it can pass a
model it loaded itself. The trainer never synchronizes the device to time a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import peftlab
from peftlab.core.config import check
from peftlab.data import DataError, StreamedTrain, collate
from peftlab.data.packing import checked_rows, collate_packed, real_tokens
from peftlab.train import checkpoint, checkpointing, fsdp, lock, rundir, signals
from peftlab.train import resume as resuming
from peftlab.train.callbacks import StepRecord, TrainCallback
from peftlab.train.config import TrainConfig, apply_overrides
from peftlab.train.distributed import make_accelerator, reduce_sum
from peftlab.train.divergence import TrainingDiverged, diverged
from peftlab.train.evaluate import evaluate, loss_sum
from peftlab.train.optim import lr_schedule, optimizer_for
from peftlab.train.taskdata import load_data, num_labels

__all__ = ["TrainConfig", "TrainingDiverged", "train"]


@lock.releasing  # the run directory's lock is released however train() exits
@signals.graceful  # SIGTERM / Ctrl-C stop at a step boundary, saving (peftlab.train.signals)
def train(
    config: TrainConfig | dict | str | Path,
    overrides: list[str] | None = None,
    model=None,
    tokenizer=None,
    resume: bool = False,
    callbacks: Sequence[TrainCallback] = (),
) -> dict:
    """Train as ``config`` says and return the run's summary (also written to summary.json).

    Args:
        config: a :class:`TrainConfig`, a dict of its keys, or a YAML path. With ``resume``,
            the run directory (its ``config.yaml`` is read) or a config whose output_dir holds
            the run.
        overrides: ``key=value`` strings applied on top (``method_args.r=8``).
        model, tokenizer: preloaded instead of loading ``config.model`` (the method is still
            applied here).
        resume: continue from the newest checkpoint in output_dir (see
            :mod:`peftlab.train.resume` for what may change and for finished runs).
        callbacks: :class:`~peftlab.train.callbacks.TrainCallback` hooks called around the
            loop and after every optimizer step (how memory and time are measured from outside).

    Returns:
        ``output_dir``, ``steps``, ``final_loss``, ``eval_before``/``eval_after``, ``tokens``,
        ``loss_tokens``, ``token_counts`` (real and padding tokens trained on), ``truncated``,
        ``trainable_params``, ``wall_time``, ``longest_batch`` and more.
    """
    from accelerate.utils import set_seed

    cfg = _resolve(config, overrides, resume)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    lock.acquire(accelerator, out)  # one writer per run directory (peftlab.train.lock)
    if not resume:
        rundir.check_output_dir(out, cfg.overwrite)
    set_seed(cfg.seed)
    run = _setup(cfg, out, accelerator, model, tokenizer)
    ckpt = resuming.restore(run) if resume else None  # checked before anything is written
    _prepare_output_dir(accelerator, cfg, out, resume, ckpt)
    if cfg.tensorboard:
        accelerator.init_trackers(
            "tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()}
        )
    try:
        eval_before = (
            run.evaluate(0)
            if cfg.eval_before and run.state["step"] == 0 and cfg.eval_size
            else None
        )
    except Exception:  # e.g. a user metric that raises: the new run leaves no files behind
        if not resume and accelerator.is_main_process:
            rundir.remove_run_files(out)
        raise
    if accelerator.is_main_process:
        accelerator.print(
            f"{cfg.method} on {cfg.model}: {run.trainable:,} of {run.total:,} parameters train "
            f"({100 * run.trainable / run.total:.3f}%); "
            f"{'streamed' if cfg.streaming else len(run.data.train)} training, "
            f"{len(run.data.validation)} validation, {len(run.data.test)} test examples"
            f"{' (labels ' + ', '.join(run.data.label_names) + ')' if run.data.label_names else ''}, "
            f"{run.data.truncated} truncated at max_length={cfg.max_length}; {run.total_steps} "
            f"steps of {run.global_batch * cfg.grad_accum} "
            f"{'examples' if run.rows is None else f'rows (of {len(run.rows)} packed)'} on "
            f"{accelerator.num_processes} process(es), {accelerator.device}"
        )
    try:
        loop = _loop(run, list(callbacks))
        resuming.end_of_training(run)  # finite weights; the final checkpoint
    except checkpoint.NonFiniteWeights as e:  # stop as diverged, naming a good checkpoint
        diverged(accelerator, out, cfg, e.step + 1, math.nan, None, run.state, str(e))
    test = run.evaluate(run.state["step"], "test") if run.data.test and cfg.eval_test else None

    fsdp.save_adapter(accelerator, run.unwrapped, out / "adapter")  # FSDP: gathered first
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


def _prepare_output_dir(
    accelerator, cfg: TrainConfig, out: Path, resume: bool, ckpt: Path | None
) -> None:
    """With ``overwrite``, clear the output directory; write the run's config and cut the
    metrics back to the checkpoint ``ckpt`` resumed from. Called once everything is checked
    (config, data, model, checkpoint) and the run directory is locked; files that another run
    wrote are never touched without ``overwrite``."""
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        if not resume and cfg.overwrite:
            rundir.remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        rundir.clean_leftovers(out)
        rundir.atomic_write(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        rundir.truncate_metrics(out / "metrics.jsonl", checkpoint.step_of(ckpt) if ckpt else 0)
        (out / "summary.json").unlink(missing_ok=True)


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
            "padded_tokens": 0,
            "loss_tokens": 0,
            "wall_time": 0.0,
            "last_loss": None,
        }
    )
    rows: list[list[int]] | None = None  # packing: training-example indices per row
    _perms: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    def micro_batch(self, m: int) -> dict[str, torch.Tensor]:
        """This process's share of global micro-batch ``m``: a pure function of (seed, m), so
        a resumed run sees exactly the batches the interrupted one would have seen. Packed,
        the rows are shuffled per epoch as examples are unpacked."""
        cfg, train, pad_id = self.cfg, self.data.train, self.tokenizer.pad_token_id
        if isinstance(train, StreamedTrain):  # in stream order; the position goes in state
            at = self.accelerator.process_index * cfg.batch_size
            streamed = train.micro_batch(m, self.global_batch, self.state)[at : at + cfg.batch_size]
            return {k: v.to(self.accelerator.device) for k, v in collate(streamed, pad_id).items()}
        epoch, pos = divmod(m, self.micro_per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            self._perms.clear()
            units = len(train) if self.rows is None else len(self.rows)
            self._perms[epoch] = torch.randperm(units, generator=g).tolist()
        start = pos * self.global_batch + self.accelerator.process_index * cfg.batch_size
        picked = self._perms[epoch][start : start + cfg.batch_size]
        if self.rows is None:
            batch = collate([train[i] for i in picked], pad_id)
        else:
            batch = collate_packed([[train[i] for i in self.rows[r]] for r in picked], pad_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def evaluate(self, step: int, split: str = "validation") -> dict:
        """Evaluate on the validation (eval_ keys) or test (test_ keys) split, shared among
        processes, and log the metrics."""
        cfg, accelerator = self.cfg, self.accelerator
        exact = cfg.eval_exact_match if cfg.eval_exact_match is not None else cfg.data_is_builtin
        with fsdp.gathered(self.unwrapped):  # FSDP: full parameters on every process
            metrics = evaluate(
                self.unwrapped,
                self.tokenizer,
                self.data,
                cfg.eval_batch_size or cfg.batch_size,
                exact,
                accelerator.device,
                (accelerator.process_index, accelerator.num_processes),
                reduce=lambda xs: reduce_sum(accelerator, xs),
                extractor=cfg.answer_extractor,
                chunked=cfg.chunked_loss,
                split=split,
                metric=cfg.metric,
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
    kind = model_kind(model if model is not None else cfg.model)
    why = f"false for {cfg.model}, a {kind} model: packing concatenates causal-LM examples"
    check(not cfg.packing or kind == "causal-lm", "packing", True, why)
    data = load_data(cfg, tokenizer, kind)  # the one place that decides data and labels
    if model is None:
        model = load_model(cfg.model, kind, num_labels=num_labels(data), pooling=cfg.pooling)
    if getattr(model, "hf_quantizer", None) is None:  # quantize/adapt on the target device
        model.to(accelerator.device)
    method_config = cfg.method_config().with_tokenizer(tokenizer)
    peftlab.apply(model, method_config)  # a classification model's new head trains (core rule)
    lengths = [len(e["input_ids"]) for e in data.train] if cfg.packing else []
    rows = checked_rows(model, lengths, cfg.max_length) if cfg.packing else None
    if cfg.gradient_checkpointing:  # peftlab's per-layer checkpointing (train/checkpointing.py)
        checkpointing.enable(model, cfg.gradient_checkpointing)
    trainable, total = peftlab.trainable_parameters(model)
    if fsdp.enabled(cfg):  # shard before the optimizer sees the parameters
        fsdp.shard(model, cfg)
    optimizer = optimizer_for(model, cfg)

    global_batch = cfg.batch_size * accelerator.num_processes
    units = len(data.train) if rows is None else len(rows)
    micro_per_epoch = units // global_batch  # the last, partial micro-batch is dropped
    if micro_per_epoch == 0 and not cfg.streaming:  # a stream ends its epochs (data/stream.py)
        raise DataError(
            f"batch_size={cfg.batch_size} × {accelerator.num_processes} process(es) = "
            f"{global_batch} exceeds the {units} training "
            f"{'examples' if rows is None else 'rows packed'}; lower batch_size or add data"
        )
    total_steps = (
        cfg.max_steps
        if cfg.max_steps is not None
        else max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    )
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, warmup, total_steps))
    # The scheduler is not given to prepare(): accelerate would step it once per process.
    if not fsdp.enabled(cfg):  # FSDP: the model is sharded and the optimizer used as they are
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
        rows=rows,
    )


# ---- the loop --------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoopResult:
    eval_after: dict | None
    longest_batch: int  # the longest padded micro-batch: it sets the activation memory peak


def _loop(run: _Run, callbacks: list[TrainCallback]) -> _LoopResult:
    """Train from ``run.state['step']`` to ``run.total_steps``: log, evaluate and checkpoint
    on schedule, and hand every step's record to ``callbacks``."""
    from tqdm.auto import tqdm

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
    for cb in callbacks:
        cb.on_train_start(run.unwrapped)
    while state["step"] < run.total_steps:
        signals.check(run)  # SIGTERM / Ctrl-C: checkpoint, adapter and exit, between steps
        t0 = time.perf_counter()
        step = state["step"] + 1
        batches = [run.micro_batch(state["micro_batch"] + i) for i in range(cfg.grad_accum)]
        loss, grad_norm, lr, tokens, loss_tokens, padded = _step(run, step, batches)
        rec = StepRecord(
            step=step,
            loss=loss,
            lr=lr,
            tokens=tokens,
            loss_tokens=loss_tokens,
            step_time=time.perf_counter() - t0,
            grad_norm=grad_norm,
            batch_length=max(b["input_ids"].shape[1] for b in batches),
        )
        longest = max(longest, rec.batch_length)
        state.update(
            step=step,
            micro_batch=state["micro_batch"] + cfg.grad_accum,
            last_loss=loss,
            tokens=state["tokens"] + tokens,
            padded_tokens=state["padded_tokens"] + padded,
            loss_tokens=state["loss_tokens"] + loss_tokens,
            wall_time=wall_before + time.perf_counter() - session_start,
        )
        for cb in callbacks:
            cb.on_step_end(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / rec.step_time:.0f}")
        if step % cfg.log_every == 0 or step == run.total_steps:
            _log_step(run, rec)
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
    for cb in callbacks:
        cb.on_train_end(run.unwrapped)
    return _LoopResult(eval_after, longest)


def _log_step(run: _Run, rec: StepRecord) -> None:
    """The step's line in metrics.jsonl (and TensorBoard)."""
    line = {
        "step": rec.step,
        "epoch": run.data.train.epoch
        if run.cfg.streaming
        else round(run.state["micro_batch"] / run.micro_per_epoch, 4),
        "loss": rec.loss,
        "lr": rec.lr,
        "tokens": rec.tokens,
        "loss_tokens": rec.loss_tokens,
        "step_time": rec.step_time,
        "tokens_per_s": rec.tokens / rec.step_time,
    }
    if rec.grad_norm is not None:
        line["grad_norm"] = rec.grad_norm
    rundir.log(run.accelerator, run.out, line, run.cfg.tensorboard)


def _step(
    run: _Run, step: int, batches: list[dict]
) -> tuple[float, float | None, float, int, int, int]:
    """One optimizer step over the micro-batches ``batches``; returns (loss, grad_norm, lr,
    tokens, loss_tokens, padded), the counts summed over processes (``padded``: padding
    tokens). Stops the run (before the update) if the loss or gradient norm is not finite."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    world = accelerator.num_processes
    # Normalize by the response tokens of the whole step, over every micro-batch and every
    # process, so grad_accum and DDP give the gradient of one big batch.
    real = [real_tokens(b) for b in batches]
    padded = sum(b["input_ids"].numel() for b in batches) - sum(real)
    local = [sum(_loss_count(b) for b in batches), sum(real), padded]
    loss_tokens, tokens, padded = (int(x) for x in reduce_sum(accelerator, local))
    scale = world / max(loss_tokens, 1)  # DDP averages gradients over processes
    loss_total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # all-reduce gradients once, after the last micro-batch
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            s, _ = loss_sum(model, batch, cfg.chunked_loss)
            accelerator.backward(s * scale)
        loss_total += s.detach().float()
    loss = reduce_sum(accelerator, [loss_total.item()])[0] / max(loss_tokens, 1)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
    bad_norm = (
        grad_norm is not None and not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16"
    )
    if not math.isfinite(loss) or bad_norm:
        # fp16's loss scaler skips steps with inf gradients itself; anything else is fatal.
        diverged(accelerator, run.out, cfg, step, loss, grad_norm, run.state)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, lr, tokens, loss_tokens, padded


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
        "token_counts": _token_counts(state),  # the padding in training batches
        "packed_rows": len(run.rows) if run.rows is not None else None,
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
        "strategy": cfg.distributed["strategy"] if run.accelerator.num_processes > 1 else None,
        "device": str(run.accelerator.device),
        "wall_time": state["wall_time"],
        "resumed_from": ckpt.name if ckpt else None,
        "longest_batch": loop.longest_batch,  # this session's widest micro-batch (tokens per row)
    }


# ---- helpers ---------------------------------------------------------------------------------


def _resolve(config, overrides: list[str] | None, resume: bool) -> TrainConfig:
    """The run's config: from a TrainConfig, dict or YAML path (with ``--resume``, a run dir)."""
    if resume:  # the run directory's own config, with only what a resume may change
        return resuming.resolve(config, overrides)
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    if isinstance(config, str | Path):
        cfg = TrainConfig.load(config, overrides)
    else:
        cfg = TrainConfig.from_dict(apply_overrides(config, overrides or []))
    return cfg


def _token_counts(state: dict) -> dict:
    """Example tokens and padding tokens in the training batches so far (all processes)."""
    real, padded = state["tokens"], state["padded_tokens"]
    return {"real": real, "padded": padded, "padding_fraction": padded / max(real + padded, 1)}


def _loss_count(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())
