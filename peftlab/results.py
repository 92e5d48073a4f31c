"""What one comparison run produced: :class:`RunResult`, the typed form of ``<run>.json``.

The JSON layout is peft's ``method_comparison`` one: ``run_info`` (the spec and the run's
times), ``train_info`` (every measurement, or the error of a failed run) and ``meta_info``
(the machine and versions). :meth:`RunResult.from_json` reads any result written by a
``peftlab compare`` of this or an earlier version: a key it does not know is ignored, a key it
misses is None. :meth:`RunResult.to_json` writes the same layout; a field marked
*omitted when None* is left out rather than written as null.

:func:`quality` is the one place that decides which figure counts as a run's quality; the
report, the claims and the recommender all read it from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any


def _opt(default: Any = None) -> Any:
    """A field left out of the JSON when it is None (a failed run has no measurements)."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


@dataclasses.dataclass
class RunInfo:
    """The run's spec (:data:`~peftlab.bench.spec.RUN_INFO_KEYS`), times and model facts."""

    method: str | None = None
    method_args: dict | None = None
    model: str | None = None
    kind: str | None = None
    data: str | None = None
    seed: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    lr: float | None = None
    fingerprint: str | None = None
    start: str | None = None
    """ISO time the worker started (UTC)."""
    end: str | None = None
    device: str | None = _opt()
    argv: list[str] | None = _opt()
    model_config: dict | None = _opt()
    """The model config's scalar entries (sizes, vocabulary, …)."""
    model_class: str | None = _opt()
    num_labels: int | None = _opt()
    """Classification only: the head's label count."""


@dataclasses.dataclass
class MemoryPrediction:
    """The estimator's predicted training peak beside the measured one
    (:func:`peftlab.bench.worker.memory_prediction` defines both)."""

    measured_bytes: int | None = None
    other_live_bytes: int | None = None
    how: str | None = None
    predicted_bytes: int | None = _opt()
    seq_len: int | None = _opt()
    parts: dict | None = _opt()
    error_ratio: float | None = _opt()
    """predicted / measured − 1."""
    error: str | None = _opt()
    """Why there is no prediction (a model the estimator cannot read)."""


@dataclasses.dataclass
class LoopMemory:
    """The training loop's own memory figures (the ``loop`` phase; see
    :mod:`peftlab.bench.measure`)."""

    bytes: int | None = None
    before_bytes: int | None = None
    """The measurement's peak before the loop: data, ``apply`` and QLoRA's quantization."""
    live_bytes: int | None = None
    live_bytes_at_start: int | None = None
    how: str | None = None
    model_tensor_bytes: int | None = None
    """The model's own tensors (4-bit constants included) when the loop started."""
    longest_batch: int | None = None
    """The longest padded micro-batch (tokens per row) the loop trained on."""


@dataclasses.dataclass
class PeakMemoryInfo:
    """``train_info.peak_memory``: each figure is defined in :mod:`peftlab.bench.measure`."""

    bytes: int | None = None
    total_bytes: int | None = None
    loaded_weights_bytes: int | None = None
    how: str | None = None
    peak_process_bytes: int | None = None
    prediction: MemoryPrediction | None = _opt()
    loop: LoopMemory | None = _opt()
    rss_before_load_bytes: int | None = None
    rss_after_load_bytes: int | None = None
    trainable_bytes: int | None = None
    frozen_bytes: int | None = None
    buffer_bytes: int | None = None
    weights_bytes: int | None = None


@dataclasses.dataclass
class Stability:
    loss_spikes: int = 0
    loss_variability: float | None = None
    definition: str | None = _opt()
    nonfinite: bool | None = _opt()


@dataclasses.dataclass
class InferenceInfo:
    """Inference timings: ``{"prefill_s", "decode_tokens_per_s"}`` per form, and ratios
    ``{"prefill_latency_ratio", "decode_speed_ratio"}`` against the base model."""

    prompts: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    base: dict | None = None
    unmerged: dict | None = None
    merged: dict | None = None
    base_in_merged_round: dict | None = None
    unmerged_vs_base: dict | None = None
    merged_vs_base: dict | None = None
    how: str | None = None
    base_again: dict | None = _opt()
    """The base model timed in the second phase (with the merged model, or alone)."""
    noise_floor: float | None = _opt()
    """:func:`peftlab.bench.timing.noise_floor`: the two phases' base timings and every
    timed model's round-to-round spread."""


@dataclasses.dataclass
class TrainInfo:
    """Every measurement of a run that succeeded (``status`` "ok"), or ``error`` and
    ``traceback`` of one that failed."""

    status: str = "ok"
    error: str | None = _opt()
    traceback: str | None = _opt()
    trainable_params: int | None = _opt()
    total_params: int | None = _opt()
    trainable_percent: float | None = _opt()
    params_after_training: dict | None = _opt()
    adapter_bytes: int | None = _opt()
    peak_memory: PeakMemoryInfo | None = _opt()
    step_time_median_s: float | None = _opt()
    tokens_per_s: float | None = _opt()
    timed_steps: int | None = _opt()
    warmup_steps: int | None = _opt()
    train_seconds: float | None = _opt()
    model_load_seconds: float | None = _opt()
    loss_curve: list | None = _opt()
    """``[[step, loss], …]``, every optimizer step."""
    eval_curve: list | None = _opt()
    final_loss: float | None = _opt()
    stability: Stability | None = _opt()
    eval: dict[str, float] | None = _opt()
    """The final evaluation: ``eval_loss``, ``eval_ppl`` and ``eval_accuracy`` or
    ``eval_exact_match``."""
    inference: InferenceInfo | None = _opt()
    test: dict[str, float] | None = _opt()
    """The test split's metrics (``test_loss``, ``test_accuracy``, …), scored once after
    training, when the data has a test split; ``eval`` is then the validation split."""
    baselines: dict | None = _opt()
    """What every method must beat, on the split the quality is reported on: ``split``,
    ``examples``, ``majority`` (classification: always the training set's most frequent
    class) and ``base_model`` (the untrained model's metrics, keys without their prefix)."""
    timing: dict | None = _opt()
    """Whether this run's timings can be stated as findings: ``reliable``, ``why``, the noise
    floor and each form's :func:`~peftlab.bench.stats.timing_verdict`."""
    tuning: dict | None = _opt()
    """With ``--tune``: the keys searched, the chosen setting and the whole search table."""
    mergeable: bool | None = _opt()
    trains_base: bool | None = _opt()
    method_config: dict | None = _opt()
    train_summary: dict | None = _opt()
    """What :func:`peftlab.train.train` returned (its ``summary.json``)."""


@dataclasses.dataclass
class MetaInfo:
    """The machine and the versions the run used."""

    host: str | None = None
    platform: str | None = None
    python: str | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    load_average: list[float] | None = None
    """1-, 5- and 15-minute load averages when the run ended."""
    cuda_device: str | None = None
    versions: dict[str, str | None] = dataclasses.field(default_factory=dict)
    load: dict | None = _opt()
    """Machine load (:func:`peftlab.bench.load.snapshot`) before the run, between its phases
    and after it, and the threads the run used and why."""


@dataclasses.dataclass
class RunResult:
    """One run's ``<run>.json``."""

    run_info: RunInfo
    train_info: TrainInfo
    meta_info: MetaInfo = dataclasses.field(default_factory=MetaInfo)

    @property
    def method(self) -> str | None:
        return self.run_info.method

    @property
    def ok(self) -> bool:
        return self.train_info.status == "ok"

    @classmethod
    def from_json(cls, data: dict) -> RunResult:
        """Read a result's JSON object; ValueError if it is not one (no run_info/train_info)."""
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), dict) for k in ("run_info", "train_info")
        ):
            raise ValueError("not a peftlab compare result: needs run_info and train_info")
        return _decode(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> RunResult | None:
        """The result in ``path``, or None when there is none (missing, partial, not a result)."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            return None

    @classmethod
    def coerce(cls, result: RunResult | dict) -> RunResult:
        """``result`` as a RunResult (a JSON object is read with :meth:`from_json`)."""
        return result if isinstance(result, RunResult) else cls.from_json(result)

    def to_json(self) -> dict:
        return _encode(self)


def _decode(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = next((t for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)), None)
        if dataclasses.is_dataclass(hints[f.name]):
            sub = hints[f.name]
        kwargs[f.name] = _decode(sub, value) if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def _encode(obj: Any) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("omit_none"):
            continue
        out[f.name] = _encode(value) if dataclasses.is_dataclass(value) else value
    return out


# ---------------------------------------------------------------- quality


@dataclasses.dataclass(frozen=True)
class Quality:
    """How well a run learned its task: one figure of one evaluation split."""

    name: str
    """"accuracy", "metric" (the user metric), "exact_match" or "loss"."""
    value: float
    higher_is_better: bool
    split: str = "validation"
    """"test" (scored once, after training) or "validation" (what tuning looked at)."""

    @property
    def score(self) -> float:
        """Higher is better: the value, or the loss negated (what tuning maximizes)."""
        return self.value if self.higher_is_better else -self.value


QUALITY_ORDER = (("accuracy", True), ("metric", True), ("exact_match", True), ("loss", False))
"""The figures :func:`quality` takes, first present wins."""


def quality_of(metrics: dict | None, prefix: str = "eval", split: str = "validation"):
    """The :class:`Quality` in one evaluation's metrics (``<prefix>_accuracy``, else the user
    metric ``<prefix>_metric``, else ``<prefix>_exact_match``, else ``<prefix>_loss``), or None
    when it holds none of them."""
    for name, higher in QUALITY_ORDER:
        v = (metrics or {}).get(f"{prefix}_{name}")
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return Quality(name, float(v), higher, split)
    return None


def final_test_metrics(result: RunResult | dict) -> dict | None:
    """The run's test-split metrics (``test_`` keys), or None when its data had no test split."""
    ti = RunResult.coerce(result).train_info
    test = ti.test if ti.test is not None else (ti.train_summary or {}).get("test")
    return test if isinstance(test, dict) and test else None


def quality(result: RunResult | dict, split: str | None = None) -> Quality | None:
    """The run's quality: accuracy (classification), else exact match (generation tasks that
    score it: the built-in tasks, or ``eval_exact_match=true``), else loss (lower is better;
    perplexity is its exponential, so it ranks the same). None when the run failed or did not
    evaluate.

    ``split``: "test" (the test split's metrics, scored once after training), "validation"
    (the final evaluation during training, ``eval_`` keys: what tuning scores), or None (the
    headline: test when the data had a test split, else validation).
    """
    r = RunResult.coerce(result)
    if not r.ok:
        return None
    if split not in (None, "test", "validation"):
        raise ValueError(f"split={split!r} must be None, 'test' or 'validation'")
    if split in (None, "test"):
        found = quality_of(final_test_metrics(r), "test", "test")
        if found is not None or split == "test":
            return found
    return quality_of(r.train_info.eval, "eval", "validation")
