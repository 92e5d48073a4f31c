"""Measurements taken inside one comparison worker: memory, speed, inference latency, stability.

Everything here is a plain function of numbers or of a model, so the statistics are unit-tested
on synthetic inputs and the same code measures every method.

Definitions (the report quotes them):

- **Peak memory** — one :class:`PeakMemory` per worker, entered right after the model loaded
  (its weights copied into the heap by :func:`own_weights`) and left when
  :func:`peftlab.train.train` returns, so it spans data loading and encoding, ``apply``
  (QLoRA's quantization and its transient float copies included), the training loop, the final
  evaluation and saving the adapter. Its counter is ``torch.cuda.max_memory_allocated`` on a
  GPU; on the CPU the kernel's peak RSS (Linux ``VmHWM``, reset on entering through
  ``/proc/self/clear_refs``; elsewhere RSS sampled every 10 ms by psutil). Entering resets
  that process-wide counter, so measurements do not nest: entering a second one raises
  RuntimeError. In ``train_info.peak_memory``:

  - ``peak_process_bytes``: the counter's peak over the whole measurement.
  - ``total_bytes``: CPU: ``peak_process_bytes`` minus the RSS before the model loaded (torch
    and transformers imported) — the model and everything training it needs (a 4-bit base
    counts as what it really occupies, including the transient of quantizing it); GPU: the
    peak allocated bytes themselves (nothing was on the device before the model).
  - ``bytes``: CPU: the peak minus the RSS right after the model loaded; GPU: as ``total``.
  - ``loop``: the training loop alone (first step to the end of the last evaluation,
    checkpoints included; setup not), measured by the bench's
    :class:`~peftlab.bench.probe.LoopProbe` callback as the phase ``"loop"`` of the same
    measurement (:meth:`PeakMemory.phase`): before resetting the counter for the phase, the
    measurement reads the peak so far into its own figure, so the whole's peak still covers
    everything before the loop. ``bytes``: the counter's peak over the loop (CUDA allocated
    bytes or RSS); ``before_bytes``: the measurement's peak before the loop began (data
    encoding, ``apply`` and QLoRA's quantization transient); ``live_bytes``: the peak of :func:`live_heap_bytes` over the loop (CPU
    with glibc, sampled every millisecond; RSS also counts freed memory glibc keeps);
    ``live_bytes_at_start``: live heap bytes when the loop began; ``model_tensor_bytes``:
    the model's own tensors then (:func:`tensor_bytes`); ``longest_batch``: the longest
    padded micro-batch.
  - ``prediction.measured_bytes`` (what the estimator is checked against): the loop's peak
    (GPU: ``loop.bytes``; CPU: ``loop.live_bytes``) minus what was live at the loop's start
    that is not model tensors (``live_bytes_at_start − model_tensor_bytes``).
- **Step time** — per optimizer step, the trainer's host time (building the batches through
  the update) plus, on a GPU, the wait for the device to finish the step (the probe
  synchronizes at each step's end; the trainer itself never does).
- **Loss spike** — a training loss (one per optimizer step) more than :data:`SPIKE_RATIO` ×
  the median of the :data:`SPIKE_WINDOW` losses before it (only counted once that many exist).
- **Loss variability** — the standard deviation of step-to-step changes of log-loss,
  ``std(log l_t − log l_{t−1})``: 0 for a smooth curve, ~0.1 for ±10% jitter.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

SPIKE_RATIO = 1.5
SPIKE_WINDOW = 10
WARMUP_STEPS = 3
"""Steps excluded from speed figures (allocator warm-up, first-call overheads)."""


# ---------------------------------------------------------------- stability


def loss_spikes(
    losses: Sequence[float], ratio: float = SPIKE_RATIO, window: int = SPIKE_WINDOW
) -> int:
    """Number of losses above ``ratio`` × the median of the ``window`` losses before them.

    A non-finite loss counts as a spike.
    """
    spikes = 0
    for i in range(window, len(losses)):
        if not math.isfinite(losses[i]) or losses[i] > ratio * statistics.median(
            losses[i - window : i]
        ):
            spikes += 1
    return spikes


def loss_variability(losses: Sequence[float]) -> float | None:
    """``std(log l_t − log l_{t−1})`` over consecutive positive finite losses; None if < 3."""
    logs = [math.log(x) for x in losses if math.isfinite(x) and x > 0]
    diffs = [b - a for a, b in zip(logs, logs[1:])]
    return statistics.pstdev(diffs) if len(diffs) >= 2 else None


def spread(values: Sequence[float | None]) -> dict | None:
    """Mean, sample std and range of the non-None values; None for fewer than two."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals),
        "min": min(vals),
        "max": max(vals),
    }


def speed(records: Sequence[dict], warmup: int = WARMUP_STEPS) -> dict:
    """Median step time and tokens/s over training records after ``warmup`` steps.

    Each record needs ``step_time`` (s) and ``tokens`` (tokens in that step's batch).
    Tokens/s is the median of the per-step rates, so one stalled step does not move it.
    """
    timed = [r for r in records if r.get("step_time") is not None]
    after = timed[warmup:] if len(timed) > warmup else timed
    if not after:
        return {"step_time_median_s": None, "tokens_per_s": None, "timed_steps": 0}
    rates = [r["tokens"] / r["step_time"] for r in after if r.get("tokens") and r["step_time"] > 0]
    return {
        "step_time_median_s": statistics.median(r["step_time"] for r in after),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "timed_steps": len(after),
        "warmup_steps": min(warmup, len(timed)),
    }


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


_MALLINFO2 = None


def live_heap_bytes() -> int | None:
    """Bytes the C heap has handed out and not yet taken back (glibc ``mallinfo2``: in-use
    arena bytes + mmapped chunks), or None without glibc ≥ 2.33.

    On the CPU every tensor's storage comes from ``malloc``, so this is the CPU counterpart
    of ``torch.cuda.memory_allocated``: live tensors (plus small C++ objects), without the
    freed memory glibc keeps in its arenas, which RSS still counts — at batch 8 that
    retention made RSS 13–33% larger than the live bytes. One call takes ~0.5 µs.
    """
    global _MALLINFO2
    if _MALLINFO2 is None:
        import ctypes
        import ctypes.util

        class _Info(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in [
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                ]
            ]

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
            fn.restype = _Info
            fn()
        except (OSError, AttributeError):
            _MALLINFO2 = False
        else:
            _MALLINFO2 = fn
    if not _MALLINFO2:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


_ACTIVE: PeakMemory | None = None
"""The measurement running in this process, if any: there can be only one (see PeakMemory)."""


class _Peaks:
    """The figures of one measured interval (a whole :class:`PeakMemory` or one phase)."""

    def __init__(self, method: str = "", name: str = "") -> None:
        self.name = name
        self.peak_bytes = 0
        """Absolute peak over the interval: CUDA allocated bytes, or the process's RSS."""
        self.peak_live_bytes: int | None = None
        """Peak of :func:`live_heap_bytes` (CPU with glibc, sampled every millisecond), else None."""
        self.start_live_bytes: int | None = None
        """Live heap bytes when the interval began (CPU with glibc), else None."""
        self.method = method
        """How ``peak_bytes`` was measured."""
        self.before_bytes: int | None = None
        """A phase: the whole measurement's peak before the phase began (same units)."""

    def to_dict(self) -> dict:
        return {
            "bytes": self.peak_bytes,
            "before_bytes": self.before_bytes,
            "live_bytes": self.peak_live_bytes,
            "live_bytes_at_start": self.start_live_bytes,
            "how": self.method,
        }


class PeakMemory(_Peaks):
    """Peak memory of a block: CUDA allocator peak, or CPU peak RSS and peak live heap bytes.

    Use as ``with PeakMemory(device) as pm: ...`` then read ``pm.peak_bytes``,
    ``pm.peak_live_bytes``, ``pm.start_live_bytes`` and ``pm.method`` (see :class:`_Peaks`).

    Entering resets the process's peak counter, so one measurement runs at a time: entering a
    second one while this one is active raises RuntimeError (the reset would erase this
    one's peak). A part of the block is measured with :meth:`phase`, which keeps the whole's
    peak: it folds the counter's peak so far into ``pm`` before resetting it for the part.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.phases: dict[str, _Peaks] = {}
        """Each finished or open :meth:`phase` by name."""
        self._phase: _Peaks | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sample_rss = False

    def __enter__(self) -> PeakMemory:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError(
                "PeakMemory cannot nest: another measurement is running in this process and "
                "entering one resets the process's peak counter, erasing that one's peak; "
                "measure a part of it with its .phase(name) instead"
            )
        self._stop.clear()
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            self._reset_counter()
            _ACTIVE = self
            return self
        if _reset_hwm():
            self.method = "VmHWM (peak RSS, reset via /proc/self/clear_refs)"
        else:
            self.method = "psutil RSS sampled every 10 ms"
            self.peak_bytes = rss_bytes()
            self._sample_rss = True
        self.peak_live_bytes = self.start_live_bytes = live_heap_bytes()
        if self._sample_rss or self.peak_live_bytes is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        try:
            if self._phase is not None:
                self.end_phase()
            self._fold()
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
            self._sample_now(self)
        finally:
            _ACTIVE = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[_Peaks]:
        """Measure a part of the block on its own: ``with pm.phase("loop") as loop: ...``."""
        part = self.begin_phase(name)
        try:
            yield part
        finally:
            self.end_phase()

    def begin_phase(self, name: str) -> _Peaks:
        """Start measuring the part ``name`` (phases do not overlap); see :meth:`phase`."""
        if _ACTIVE is not self:
            raise RuntimeError(f"phase {name!r}: this PeakMemory is not running")
        if self._phase is not None:
            raise RuntimeError(
                f"phase {name!r}: phase {self._phase.name!r} is still open; phases do not nest"
            )
        self._fold()  # the whole's peak so far, read before the reset erases it
        part = _Peaks(self.method, name)
        part.before_bytes = self.peak_bytes
        self._reset_counter()
        if self._sample_rss:
            part.peak_bytes = rss_bytes()
        if self.peak_live_bytes is not None:
            part.peak_live_bytes = part.start_live_bytes = live_heap_bytes()
        with self._lock:
            self._phase = self.phases[name] = part
        return part

    def end_phase(self) -> _Peaks:
        """Finish the open phase and return its figures."""
        part = self._phase
        if part is None:
            raise RuntimeError("end_phase(): no phase is open")
        if not self._sample_rss:
            part.peak_bytes = self._read_counter()
        self._sample_now(part)
        with self._lock:
            self._phase = None
            self.peak_bytes = max(self.peak_bytes, part.peak_bytes)
        return part

    # The counter is the CUDA allocator's peak or the kernel's VmHWM; without either, RSS is
    # sampled and there is nothing to reset.
    def _read_counter(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kb("VmHWM") or rss_bytes()

    def _reset_counter(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not self._sample_rss:
            _reset_hwm()

    def _fold(self) -> None:
        if not self._sample_rss:
            peak = self._read_counter()
            with self._lock:
                self.peak_bytes = max(self.peak_bytes, peak)

    def _sample_now(self, target: _Peaks) -> None:
        """One last sample into ``target`` (and the whole), so a peak at the very end counts."""
        live = live_heap_bytes() if self.peak_live_bytes is not None else None
        rss = rss_bytes() if self._sample_rss else None
        with self._lock:
            for p in (self,) if target is self else (self, target):
                if live is not None and p.peak_live_bytes is not None:
                    p.peak_live_bytes = max(p.peak_live_bytes, live)
                if rss is not None:
                    p.peak_bytes = max(p.peak_bytes, rss)

    def _sample(self) -> None:
        live = self.peak_live_bytes is not None
        tick = 0
        while not self._stop.wait(0.001):
            tick += 1
            now_live = live_heap_bytes() if live else None
            now_rss = rss_bytes() if self._sample_rss and tick % 10 == 0 else None
            with self._lock:
                for p in (self, self._phase):
                    if p is None:
                        continue
                    if now_live is not None and p.peak_live_bytes is not None:
                        p.peak_live_bytes = max(p.peak_live_bytes, now_live)
                    if now_rss is not None:
                        p.peak_bytes = max(p.peak_bytes, now_rss)


def own_weights(model: nn.Module) -> None:
    """Copy every parameter and buffer out of the safetensors file mapping into ordinary
    (heap) memory, so that the weights count in RSS and in :func:`live_heap_bytes` from the
    start, and a method that replaces them (QLoRA) really gives the float copy back."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def tensor_bytes(model: nn.Module) -> dict:
    """Bytes held by the model's parameters and buffers, split trainable / frozen."""
    trainable = frozen = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # bitsandbytes keeps 4-bit quantization constants outside the parameter storage.
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (
                getattr(qs, "absmax", None),
                getattr(getattr(qs, "state2", None), "absmax", None),
            ):
                if isinstance(t, torch.Tensor):
                    buffers += t.numel() * t.element_size()
    return {
        "trainable_bytes": trainable,
        "frozen_bytes": frozen,
        "buffer_bytes": buffers,
        "weights_bytes": trainable + frozen + buffers,
    }


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the regular files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
