"""The bench's view of the training loop: a :class:`~peftlab.train.callbacks.TrainCallback`
that measures :func:`peftlab.train.train` from outside.

:class:`LoopProbe` makes the loop (first step to the end of the last evaluation, checkpoints
included) a phase ``"loop"`` of the worker's one :class:`~peftlab.bench.measure.PeakMemory`,
notes the model's tensor bytes when the loop starts and the longest batch, and keeps every
step's record with an exact step time: the trainer's host time plus the wait for the device
to finish the step (the probe synchronizes CUDA at each step's end; the trainer never does).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from peftlab.bench.measure import PeakMemory, tensor_bytes
from peftlab.results import LoopMemory
from peftlab.train.callbacks import StepRecord


class LoopProbe:
    """Measures the training loop inside the running ``peak`` measurement."""

    def __init__(self, peak: PeakMemory) -> None:
        self.peak = peak
        self.records: list[dict] = []
        """Every step's :class:`StepRecord` as a dict, ``step_time`` including the device."""
        self.model_tensor_bytes: int | None = None
        self.longest_batch = 0
        self._loop = None

    def on_train_start(self, model) -> None:
        self.model_tensor_bytes = tensor_bytes(model)["weights_bytes"]
        self._loop = self.peak.begin_phase("loop")

    def on_step_end(self, record: StepRecord) -> None:
        t = time.perf_counter()
        if self.peak.device.type == "cuda":
            torch.cuda.synchronize(self.peak.device)
        waited = time.perf_counter() - t
        self.records.append({**dataclasses.asdict(record), "step_time": record.step_time + waited})
        self.longest_batch = max(self.longest_batch, record.batch_length)

    def on_train_end(self, model) -> None:
        self.peak.end_phase()

    def memory(self) -> LoopMemory | None:
        """The loop's memory figures; None if the loop never started."""
        if self._loop is None:
            return None
        return LoopMemory(
            **self._loop.to_dict(),
            model_tensor_bytes=self.model_tensor_bytes,
            longest_batch=self.longest_batch,
        )
