"""What :func:`peftlab.train.train` tells code that watches it from outside.

The trainer measures nothing itself. It hands each :class:`TrainCallback` the model once
before the first step and once after the last, and a :class:`StepRecord` after every
optimizer step; memory, timing and profiling are callbacks that live with whoever measures
(``peftlab.bench``), never in the trainer.

Order within one :func:`~peftlab.train.train` call (a resumed run starts a new session):

1. ``on_train_start(model)``: setup, resume and the evaluation before training are done;
   the first step of this session is next.
2. ``on_step_end(record)``: right after each optimizer step (the update applied, gradients
   cleared), before that step's logging, evaluation and checkpoint.
3. ``on_train_end(model)``: after the last step's evaluation and checkpoint, before the
   adapter and ``summary.json`` are written. Not called when training raises
   (:class:`~peftlab.train.TrainingDiverged`): a callback that holds resources must not rely
   on it alone.

``model`` is the model itself (unwrapped from DistributedDataParallel). Under several
processes every process calls its own callbacks; a record's counts and loss are already
summed / averaged over processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as the trainer saw it."""

    step: int
    """Optimizer steps done, this one included (1-based; continues across a resume)."""
    loss: float
    """Mean loss per response token over the step's micro-batches and processes."""
    lr: float
    """Learning rate the update used."""
    tokens: int
    """Tokens the step processed (attention-mask ones), summed over micro-batches and processes."""
    loss_tokens: int
    """Tokens that carried a loss (response tokens; one per example for classification)."""
    step_time: float
    """Host wall-clock seconds from building the step's batches to the update's return. The
    trainer never synchronizes the device for it, so on an asynchronous device (CUDA) it can
    end before the device finished; a callback that needs exact times synchronizes itself."""
    grad_norm: float | None
    """Gradient norm before clipping; None when ``max_grad_norm`` is unset."""
    batch_length: int
    """Longest padded micro-batch of the step (tokens per row): it sets the activation size."""


@runtime_checkable
class TrainCallback(Protocol):
    """Hooks :func:`peftlab.train.train` calls; see the module docstring for when."""

    def on_train_start(self, model: Any) -> None: ...

    def on_step_end(self, record: StepRecord) -> None: ...

    def on_train_end(self, model: Any) -> None: ...
