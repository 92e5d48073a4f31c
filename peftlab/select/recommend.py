"""``peftlab recommend``: rank every method for a model, a memory budget and a task.

For each method the recommender searches a small ladder of configurations (rank or size,
targets, then activation checkpointing — none, every 4th layer, every 2nd, every layer — then
micro-batch with gradient accumulation) for the best one whose *predicted* peak
(:func:`peftlab.select.estimator.estimate_memory`) fits in ``HEADROOM`` × the budget, then
ranks the methods: those that fit first, then by a score

    score = w_q · quality + (1 − w_q) · speed − (0.3 · inference overhead if latency-critical)

with ``w_q`` = 0.85 / 0.65 / 0.45 for ``--quality highest / high / balanced``. Quality and
speed are priors from the papers (each method's ``MethodProfile`` in
:data:`peftlab.select.models.MODELS`; sources in docs/estimator.md) unless
``--results DIR`` points at a ``peftlab compare`` output, whose measured tokens/s, quality
(the ``quality`` recorded in each result, relative to the best measured method) and inference
latency ratios replace them. Checkpointing a share ``s`` of the layers costs one extra forward
of them: speed × 3 / (3 + s) (a forward is about a third of a step). A causal LM's plans use
the trainer's chunked loss (its default; exact, and about as fast as the plain loss), and a
reason says so when the plain loss would not have fitted. On several devices (``devices``)
every plan must fit each device (:mod:`peftlab.select.devices`): for each setting DDP is tried
first (it moves only the gradients of what trains), then FSDP, and the reason shows the
per-device sum.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.optimizers import get_optimizer
from peftlab.core.registry import get_method
from peftlab.select.activations import parse_checkpointing
from peftlab.select.devices import STRATEGIES, parse_devices
from peftlab.select.estimator import GB, MemoryEstimate, estimate_memory
from peftlab.select.models import MODELS, modelled_methods
from peftlab.select.presets import BERT, Architecture, resolve_architecture

TASKS = ("generation", "classification", "multi-task")
QUALITY_WEIGHT = {"highest": 0.85, "high": 0.65, "balanced": 0.45}
HEADROOM = 0.9
"""Share of the budget a plan may use: the rest is for the CUDA context, allocator
fragmentation and the framework's own buffers."""


@dataclasses.dataclass
class Recommendation:
    method: str
    fits: bool
    peak_memory_gb: float
    reason: str
    config: dict
    quality: float
    speed: float
    inference_overhead: str
    score: float
    source: str
    """"priors" or "measured" (from --results)."""
    available: bool
    breakdown_gb: dict

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ranked_methods() -> list[str]:
    """Registered methods the recommender ranks: those in :data:`~peftlab.select.models.MODELS`
    (a memory plan and priors)."""
    return modelled_methods()


CHECKPOINTING_LADDER = (False, {"every": 4}, {"every": 2}, True)
"""Activation checkpointing the ladder tries, least recompute first (the training config's
``gradient_checkpointing`` values)."""


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every plan of one ``recommend`` call shares."""

    arch: Architecture
    budget: float
    """Bytes."""
    seq_len: int
    batch_size: int
    dtype: str
    optimizer: str
    device: str
    quality: str
    chunked_loss: bool
    devices: int = 1
    strategy: str | None = None
    """The strategy asked for; None: DDP where it fits, else FSDP (on several devices)."""

    def strategies(self) -> tuple[str | None, ...]:
        """Strategies to try for each candidate, in order of preference."""
        if self.devices == 1:
            return (None,)
        return (self.strategy,) if self.strategy else STRATEGIES

    def estimate(
        self, cfg: dict, micro: int, ckpt: Any, chunked: bool, strategy: str | None = None
    ) -> MemoryEstimate:
        return estimate_memory(
            self.arch,
            cfg,
            micro,
            self.seq_len,
            self.dtype,
            self.optimizer,
            ckpt,
            "sdpa",
            self.device,
            chunked_loss=chunked,
            devices=self.devices,
            strategy=strategy,
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One method's configuration: the first on the ladder that fits, or the smallest tried."""

    cfg: dict
    est: MemoryEstimate
    micro: int
    ckpt: Any
    """The ``gradient_checkpointing`` value (False, True or ``{"every": k}``)."""
    fits: bool
    needs_chunked: bool = False
    """It fits with the chunked loss but would not with the plain one."""


def _checkpointing_levels(arch: Architecture) -> list[Any]:
    """:data:`CHECKPOINTING_LADDER` without the levels that pick the same layers as an earlier
    one (every 4th and every 2nd are both layer 0 of a 2-layer model)."""
    seen, levels = set(), []
    for spec in CHECKPOINTING_LADDER:
        layers = parse_checkpointing(spec, arch.layers).layers
        if layers not in seen:
            seen.add(layers)
            levels.append(spec)
    return levels


def _candidates(name: str, run: _Run):
    """``(config, micro-batch, checkpointing, strategy)`` in ladder order: settings (best
    quality first), then on several devices the strategy (DDP, then FSDP, unless the run names
    one), then checkpointing (least recompute first), then micro-batch (largest first)."""
    per_device = math.ceil(run.batch_size / run.devices)  # each device runs its own micro-batch
    micro_batches = dict.fromkeys(b for b in (per_device, 8, 4, 2, 1) if b <= per_device)
    prior = MODELS[name].profile
    ladder = prior.ladder(run.arch, run.quality) if prior.ladder else [{}]
    # A method with its own switches (QLoRA) gets the run's checkpointing of every layer (its
    # own field turns transformers' on) and compute dtype.
    own = {f.name for f in dataclasses.fields(get_method(name).config_cls)}
    levels = _checkpointing_levels(run.arch)
    for settings, strategy in itertools.product(ladder, run.strategies()):
        for ckpt, micro in itertools.product(levels, micro_batches):
            cfg = {"method": name, **settings}
            if "gradient_checkpointing" in own:
                cfg["gradient_checkpointing"] = ckpt is True
            if "compute_dtype" in own:
                fp32 = run.dtype in ("float32", "fp32")
                cfg["compute_dtype"] = "float32" if fp32 else "bfloat16"
            yield cfg, micro, ckpt, strategy


def _plan_method(name: str, run: _Run) -> _Plan:
    """The first candidate that fits in ``HEADROOM`` × the budget, else the smallest tried."""
    limit = HEADROOM * run.budget
    smallest = None
    for cfg, micro, ckpt, strategy in _candidates(name, run):
        est = run.estimate(cfg, micro, ckpt, run.chunked_loss, strategy)
        if smallest is None or est.peak <= smallest.est.peak:  # ties: the later, smaller plan
            smallest = _Plan(cfg, est, micro, ckpt, False)
        if est.peak <= limit:
            plain = run.estimate(cfg, micro, ckpt, False, strategy) if est.chunked_loss else est
            return _Plan(cfg, est, micro, ckpt, True, needs_chunked=plain.peak > limit)
    return smallest


def _measured(results: str | Path | None, known: set[str]) -> dict[str, dict]:
    """Per method from a ``peftlab compare`` directory (every ``*.json`` below it that is a
    :class:`~peftlab.results.RunResult` of a successful run of a method in ``known``):
    ``tokens_per_s`` (``train_info.tokens_per_s``), ``quality``
    (:func:`peftlab.results.quality`: accuracy, else exact match, else eval loss) and
    ``latency_ratio`` (``train_info.inference``: merged against base, else unmerged)."""
    from peftlab.results import RunResult, quality

    if not results:
        return {}
    root = Path(results)
    if not root.is_dir():
        raise ConfigError(
            f"--results {root} is not a directory; pass the output directory of `peftlab compare`"
        )
    found: dict[str, dict] = {}
    for path in sorted(root.rglob("*.json")):
        r = RunResult.load(path)
        if r is None or r.method not in known or not r.ok:
            continue
        inf = r.train_info.inference
        ratios = (inf.merged_vs_base or inf.unmerged_vs_base or {}) if inf else {}
        found[r.method] = {
            "tokens_per_s": r.train_info.tokens_per_s,
            "quality": quality(r),
            "latency_ratio": ratios.get("prefill_latency_ratio"),
        }
    if not found:
        raise ConfigError(
            f"--results {root} holds no peftlab compare result (<method>.json with run_info/train_info)"
        )
    return found


def _relative_quality(measured: dict[str, dict]) -> dict[str, float]:
    """Each measured method's quality relative to the best of those measured alike, in (0, 1]:
    ``value / best`` for a score (accuracy, exact match; a best of 0 says nothing and is
    skipped), ``exp(best − value)`` for the eval loss."""
    qualities = {m: v["quality"] for m, v in measured.items() if v["quality"] is not None}
    best: dict[str, float] = {}
    for q in qualities.values():
        pick = max if q.higher_is_better else min
        best[q.name] = pick(best.get(q.name, q.value), q.value)
    out = {}
    for method, q in qualities.items():
        if not q.higher_is_better:
            out[method] = math.exp(best[q.name] - q.value)
        elif best[q.name] > 0:
            out[method] = q.value / best[q.name]
    return out


def recommend(
    model: str,
    memory_gb: float,
    task: str = "generation",
    latency_critical: bool = False,
    quality: str = "high",
    results: str | Path | None = None,
    seq_len: int = 512,
    batch_size: int = 16,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    device: str = "cuda",
    chunked_loss: bool = True,
    devices: int = 1,
    strategy: str | None = None,
) -> list[Recommendation]:
    """Every method ranked for ``model`` in ``memory_gb`` of memory, best first.

    Args:
        model: preset, bundled model name or local HF directory.
        memory_gb: the memory of the device training runs on (of each, on several), in GB
            (10^9 bytes).
        task: "generation", "classification" or "multi-task".
        latency_critical: inference latency matters: methods that merge into the base win.
        quality: "highest", "high" or "balanced" (trades quality against training speed).
        results: a ``peftlab compare`` output directory; its measured speed/quality replace priors.
        seq_len, batch_size: training sequence length and effective batch size.
        dtype, optimizer, device: as :func:`estimate_memory`.
        chunked_loss: plan a causal LM with the trainer's chunked loss (its default); False:
            with the plain loss over the full logits.
        devices: devices training runs on; every plan must fit each device, and the effective
            batch is micro-batch × grad accum × devices.
        strategy: "ddp" or "fsdp" (:mod:`peftlab.select.devices`); None: for each candidate
            DDP, and FSDP where DDP does not fit.

    Raises:
        ConfigError: an unknown model (lists the presets), task, quality or strategy, a budget
            ≤ 0, a device count < 1, or FSDP on one device.
    """
    _check_request(memory_gb, task, quality, optimizer)
    parse_devices(devices, strategy)
    arch = resolve_architecture(model)
    run = _Run(
        *(arch, memory_gb * GB, seq_len, batch_size, dtype, optimizer, device, quality),
        *(chunked_loss, devices, strategy),
    )
    names = ranked_methods()
    measured = _measured(results, set(names))
    priors = _Priors(task, measured)
    ranked = [_recommendation(method, run, priors, latency_critical) for method in names]
    overheads = {r.method: overhead for r, overhead in ranked}
    recs = [r for r, _ in ranked]
    # Equal scores (e.g. prefix and P-Tuning v2 on generation): less inference overhead first,
    # then by name, so the order does not depend on the order methods were registered in.
    recs.sort(key=lambda r: (not r.fits, not r.available, -r.score, overheads[r.method], r.method))
    return recs


def _check_request(memory_gb, task, quality, optimizer) -> None:
    """Raise :class:`ConfigError` naming the first invalid argument of :func:`recommend`."""
    if not isinstance(memory_gb, int | float) or not math.isfinite(memory_gb) or memory_gb <= 0:
        raise ConfigError(
            f"memory_gb={memory_gb!r} is invalid: memory_gb must be a positive number of GB, e.g. 24."
        )
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is invalid: task must be one of {', '.join(TASKS)}.")
    if quality not in QUALITY_WEIGHT:
        raise ConfigError(
            f"quality={quality!r} is invalid: quality must be one of {', '.join(QUALITY_WEIGHT)}."
        )
    get_optimizer(optimizer)  # an unknown name is a ConfigError that lists the known ones


class _Priors:
    """Quality, speed and inference overhead of each method for one task: the priors, or what
    ``--results`` measured."""

    def __init__(self, task: str, measured: dict[str, dict]) -> None:
        self.task = task
        self.measured = measured
        self.best_speed = (
            max((m["tokens_per_s"] or 0) for m in measured.values()) if measured else 0
        )
        self.quality = _relative_quality(measured)

    def of(self, method: str) -> tuple[float, float, float, str]:
        """``(quality, speed, overhead, source)``."""
        prior = MODELS[method].profile
        q, speed, overhead, source = prior.quality[self.task], prior.speed, prior.overhead, "priors"
        m = self.measured.get(method)
        if m:
            source = "measured"
            if m["tokens_per_s"] and self.best_speed:
                speed = m["tokens_per_s"] / self.best_speed
            q = self.quality.get(method, q)
            if m["latency_ratio"]:
                overhead = max(0.0, m["latency_ratio"] - 1)
        return q, speed, overhead, source


def _recommendation(
    method: str, run: _Run, priors: _Priors, latency_critical: bool
) -> tuple[Recommendation, float]:
    """The method's plan, scored: ``(recommendation, inference overhead)``."""
    plan = _plan_method(method, run)
    est = plan.est
    q, speed, overhead, source = priors.of(method)
    if plan.fits and est.checkpointed_layers:
        # One extra forward of the checkpointed layers (a forward is ~⅓ of a step).
        speed = speed * 3 / (3 + len(est.checkpointed_layers) / run.arch.layers)
    w = QUALITY_WEIGHT[run.quality]
    score = w * q + (1 - w) * min(speed, 1.5) / 1.5 - (0.3 * overhead if latency_critical else 0.0)
    settings = {k: v for k, v in plan.cfg.items() if k != "method"}
    config = {
        "method_args": settings,
        "micro_batch_size": plan.micro,
        "grad_accum": _accum(run, plan),
        "gradient_checkpointing": plan.ckpt,
        "seq_len": run.seq_len,
        "dtype": est.dtype,
        "optimizer": run.optimizer,
    }
    if run.arch.family != BERT:
        config["chunked_loss"] = est.chunked_loss
    if run.devices > 1:
        config["devices"] = run.devices
        config["distributed"] = {"strategy": est.strategy}
    prior = MODELS[method].profile
    rec = Recommendation(
        method,
        plan.fits,
        round(est.peak / GB, 2),
        _reason(method, plan, run, settings, prior, latency_critical) + _unsupported(method, est),
        config,
        round(q, 3),
        round(speed, 3),
        prior.inference,
        round(score, 4),
        source,
        True,
        {k: v for k, v in est.to_dict()["gb"].items()},
    )
    return rec, overhead


def _unsupported(method: str, est: MemoryEstimate) -> str:
    """What ``peftlab train`` cannot run yet of a plan the arithmetic allows."""
    if method == "qlora" and est.strategy == "fsdp":
        return (
            "; NOTE: peftlab train does not run QLoRA under FSDP yet (the 4-bit storage needs "
            "bitsandbytes' quant_storage on CUDA; refused with a one-line error): the figure is "
            "what the sharding would need"
        )
    return ""


def _savers(est: MemoryEstimate, chunked: bool) -> str:
    """ "chunked loss and checkpointing every 2nd layer" (what a plan relies on), or ""."""
    parts = ["chunked loss"] if chunked else []
    return " and ".join(parts + ([est.checkpointing] if est.checkpointed_layers else []))


def _accum(run: _Run, plan: _Plan) -> int:
    """Gradient accumulation steps that keep the effective batch (micro × accum × devices)."""
    return max(1, math.ceil(run.batch_size / (plan.micro * run.devices)))


def _where(est: MemoryEstimate) -> str:
    """ " per device on 4 devices with FSDP", or "" on one device."""
    return (
        f" per device on {est.devices} devices with {est.strategy.upper()}"
        if est.devices > 1
        else ""
    )


def _reason(method, plan: _Plan, run: _Run, settings, prior, latency) -> str:
    est, gb, where = plan.est, run.budget / GB, _where(plan.est)
    arithmetic = f"; {est.per_device()}" if est.devices > 1 else ""
    if not plan.fits:
        if est.weights > HEADROOM * run.budget:
            bits = "4-bit" if est.detail["quantized_params"] else est.dtype
            return (
                f"does not fit: the {bits} weights alone take {est.weights / GB:.1f} GB of "
                f"{gb:g} GB{where} ({run.arch.total_params() / 1e9:.1f}B parameters){arithmetic}"
            )
        parts = ", ".join(
            f"{k} {v:.1f}"
            for k, v in est.to_dict()["gb"].items()
            if k not in ("peak", "inference") and v
        )
        savers = _savers(est, est.chunked_loss)
        return (
            f"does not fit: {est.peak / GB:.1f} GB{where} at batch {plan.micro}"
            f"{' with ' + savers if savers else ''} ({parts} GB) > {HEADROOM:.0%} of {gb:g} GB"
            f"{arithmetic}"
        )
    knobs = ", ".join(
        f"{k}={v}"
        for k, v in settings.items()
        if k not in ("compute_dtype", "gradient_checkpointing")
    )
    batch = f"{plan.micro}×{_accum(run, plan)}" + (f"×{run.devices}" if run.devices > 1 else "")
    needed = _savers(est, plan.needs_chunked)
    mergeable = get_method(method).config_cls.mergeable
    tail = (
        "merges into the base: no inference overhead"
        if mergeable
        else f"inference: {prior.inference}"
    )
    if latency and not mergeable:
        tail = f"latency-critical, but {prior.inference}"
    return (
        f"fits at {est.peak / GB:.1f} of {gb:g} GB{where}"
        f"{(' and ' if where else ' with ') + needed if needed else ''} "
        f"({knobs + ', ' if knobs else ''}batch {batch}); {tail}{arithmetic}"
    )


def format_table(recs: list[Recommendation]) -> str:
    lines = [
        f"{'#':>2} {'method':<11}{'fits':<5}{'peak GB':>8} {'quality':>8} {'speed':>6}  reason"
    ]
    for i, r in enumerate(recs, 1):
        flag = "yes" if r.fits else "no"
        note = "" if r.available else " [not installed]"
        lines.append(
            f"{i:>2} {r.method:<11}{flag:<5}{r.peak_memory_gb:>8.1f} {r.quality:>8.2f} {r.speed:>6.2f}  {r.reason}{note}"
        )
    best = recs[0]
    lines.append("")
    lines.append(
        f"recommended: {best.method} — {json.dumps(best.config)}"
        if best.fits
        else "no method fits this budget; see the reasons above"
    )
    return "\n".join(lines)
