"""``peftlab recommend``: rank every method for a model, a memory budget and a task.

For each method the recommender searches a small ladder of configurations (rank or size,
targets, micro-batch with gradient accumulation, gradient checkpointing) for the best one
whose *predicted* peak (:func:`peftlab.select.estimator.estimate_memory`) fits in
``HEADROOM`` × the budget, then ranks the methods: those that fit first, then by a score

    score = w_q · quality + (1 − w_q) · speed − (0.3 · inference overhead if latency-critical)

with ``w_q`` = 0.85 / 0.65 / 0.45 for ``--quality highest / high / balanced``. Quality and
speed are priors from the papers (each method's ``MethodProfile`` in
:data:`peftlab.select.models.MODELS`; sources in docs/estimator.md) unless
``--results DIR`` points at a ``peftlab compare`` output, whose measured tokens/s, quality
(the ``quality`` recorded in each result, relative to the best measured method) and inference
latency ratios replace them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.optimizers import get_optimizer
from peftlab.core.registry import get_method
from peftlab.select.estimator import GB, estimate_memory
from peftlab.select.models import MODELS, modelled_methods
from peftlab.select.presets import resolve_architecture

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


def _plan_method(name, arch, budget, seq, batch, dtype, optimizer, device, quality):
    """The first ladder setting that fits: (config, estimate, micro-batch, checkpointing) or the
    smallest plan tried (with fits False)."""
    micro_batches = [b for b in (batch, 8, 4, 2, 1) if b <= batch]
    prior = MODELS[name].profile
    ladder = prior.ladder(arch, quality) if prior.ladder else [{}]
    # A method with its own switches (QLoRA) gets the run's checkpointing and compute dtype.
    own = {f.name for f in dataclasses.fields(get_method(name).config_cls)}
    smallest = None
    for settings in ladder:
        for ckpt in (False, True):
            for micro in dict.fromkeys(micro_batches):
                cfg = {"method": name, **settings}
                if "gradient_checkpointing" in own:
                    cfg["gradient_checkpointing"] = ckpt
                if "compute_dtype" in own:
                    cfg["compute_dtype"] = "float32" if dtype in ("float32", "fp32") else "bfloat16"
                est = estimate_memory(arch, cfg, micro, seq, dtype, optimizer, ckpt, "sdpa", device)
                if smallest is None or est.peak < smallest[1].peak:
                    smallest = (cfg, est, micro, ckpt)
                if est.peak <= HEADROOM * budget:
                    return cfg, est, micro, ckpt, True
    return (*smallest, False)


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
) -> list[Recommendation]:
    """Every method ranked for ``model`` in ``memory_gb`` of memory, best first.

    Args:
        model: preset, bundled model name or local HF directory.
        memory_gb: the memory of the device training runs on, in GB (10^9 bytes).
        task: "generation", "classification" or "multi-task".
        latency_critical: inference latency matters: methods that merge into the base win.
        quality: "highest", "high" or "balanced" (trades quality against training speed).
        results: a ``peftlab compare`` output directory; its measured speed/quality replace priors.
        seq_len, batch_size: training sequence length and effective batch size.
        dtype, optimizer, device: as :func:`estimate_memory`.

    Raises:
        ConfigError: an unknown model (lists the presets), task or quality, or a budget ≤ 0.
    """
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
    arch = resolve_architecture(model)
    budget = memory_gb * GB
    names = ranked_methods()
    measured = _measured(results, set(names))
    best_speed = max((m["tokens_per_s"] or 0) for m in measured.values()) if measured else 0
    measured_quality = _relative_quality(measured)
    recs = []
    overheads: dict[str, float] = {}
    w = QUALITY_WEIGHT[quality]
    for method in names:
        prior = MODELS[method].profile
        cfg, est, micro, ckpt, fits = _plan_method(
            method, arch, budget, seq_len, batch_size, dtype, optimizer, device, quality
        )
        q = prior.quality[task]
        speed, overhead, source = prior.speed, prior.overhead, "priors"
        m = measured.get(method)
        if m:
            source = "measured"
            if m["tokens_per_s"] and best_speed:
                speed = m["tokens_per_s"] / best_speed
            q = measured_quality.get(method, q)
            if m["latency_ratio"]:
                overhead = max(0.0, m["latency_ratio"] - 1)
        if ckpt and fits:
            speed *= 0.75  # one extra forward per step: ~4/3 of the compute
        score = (
            w * q + (1 - w) * min(speed, 1.5) / 1.5 - (0.3 * overhead if latency_critical else 0.0)
        )
        settings = {k: v for k, v in cfg.items() if k != "method"}
        config = {
            "method_args": settings,
            "micro_batch_size": micro,
            "grad_accum": max(1, math.ceil(batch_size / micro)),
            "gradient_checkpointing": ckpt,
            "seq_len": seq_len,
            "dtype": est.dtype,
            "optimizer": optimizer,
        }
        overheads[method] = overhead
        recs.append(
            Recommendation(
                method,
                fits,
                round(est.peak / GB, 2),
                _reason(
                    method,
                    est,
                    fits,
                    budget,
                    arch,
                    settings,
                    micro,
                    ckpt,
                    batch_size,
                    prior,
                    latency_critical,
                ),
                config,
                round(q, 3),
                round(speed, 3),
                prior.inference,
                round(score, 4),
                source,
                True,
                {k: v for k, v in est.to_dict()["gb"].items()},
            )
        )
    # Equal scores (e.g. prefix and P-Tuning v2 on generation): less inference overhead first,
    # then by name, so the order does not depend on the order methods were registered in.
    recs.sort(key=lambda r: (not r.fits, not r.available, -r.score, overheads[r.method], r.method))
    return recs


def _reason(method, est, fits, budget, arch, settings, micro, ckpt, batch, prior, latency) -> str:
    gb = budget / GB
    if not fits:
        if est.weights > HEADROOM * budget:
            bits = "4-bit" if est.detail["quantized_params"] else est.dtype
            return (
                f"does not fit: the {bits} weights alone take {est.weights / GB:.1f} GB of "
                f"{gb:g} GB ({arch.total_params() / 1e9:.1f}B parameters)"
            )
        parts = ", ".join(
            f"{k} {v:.1f}"
            for k, v in est.to_dict()["gb"].items()
            if k not in ("peak", "inference") and v
        )
        return (
            f"does not fit: {est.peak / GB:.1f} GB at batch 1 with checkpointing "
            f"({parts} GB) > {HEADROOM:.0%} of {gb:g} GB"
        )
    knobs = ", ".join(
        f"{k}={v}"
        for k, v in settings.items()
        if k not in ("compute_dtype", "gradient_checkpointing")
    )
    plan = f"{knobs + ', ' if knobs else ''}batch {micro}×{max(1, math.ceil(batch / micro))}{', checkpointing' if ckpt else ''}"
    mergeable = get_method(method).config_cls.mergeable
    tail = (
        "merges into the base: no inference overhead"
        if mergeable
        else f"inference: {prior.inference}"
    )
    if latency and not mergeable:
        tail = f"latency-critical, but {prior.inference}"
    return f"fits at {est.peak / GB:.1f} of {gb:g} GB ({plan}); {tail}"


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
