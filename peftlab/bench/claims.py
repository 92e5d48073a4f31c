"""The user's document's comparison table, and the criteria that check each cell against a
measurement.

The table (section "方法对比分析 / 参数量与显存对比" of the document) rates each method on
trainable parameters, memory (显存占用), inference overhead (推理开销) and training stability
(训练稳定性). Its words become levels here; :data:`CRITERIA` gives each level its measured
criterion (every report quotes it). Quality is not judged: the table makes no quality claim.

A claim *held* when the measured level equals the stated one; otherwise it is "better than
claimed" or "worse than claimed" (lower memory/overhead, higher stability count as better), or
for trainable parameters "above/below the range". An inference-overhead claim is "not judged"
when the run's timings are unreliable (a busy machine, :mod:`peftlab.bench.timing`), and "not
separated from noise" when the measured slowdown lies inside a noise floor wide enough to
reach the claimed level: no verdict is ever built on noise.
"""

from __future__ import annotations

import statistics

from peftlab.bench.timing import overhead_fraction

__all__ = ["CRITERIA", "DOCUMENT_TABLE", "check_claims", "overhead_fraction", "overhead_level"]

CRITERIA = (
    '**Trainable parameters**: the stated % range, inclusive (DoRA\'s "+ weight dimension" '
    "also requires DoRA to train more parameters than LoRA with the same rank and targets).",
    "**Memory**: `train_info.peak_memory.total_bytes` (the process's peak from right after the "
    "model loaded through training, data loading, `apply` and QLoRA's quantization included, "
    "minus the process's memory before the model loaded) as a ratio `q` to full "
    "fine-tuning's: high `q ≥ 0.9`; medium `0.5 ≤ q < 0.9`; low `q < 0.5`; very low: low *and* "
    "within 5% of the smallest of all methods measured. Needs `full` in the comparison.",
    "**Inference overhead** of the form one would deploy (merged where the method merges, "
    "otherwise unmerged): slowdown `o = max(prefill latency ratio, 1 / decode speed ratio) − 1` "
    "against the base model timed in the same process on the same prompts. A slowdown inside "
    "the run's noise floor (each model timed against itself: the base in two phases, every "
    "model across its rounds) is *within "
    "noise* and counts as none/very low; a merged adapter or full fine-tuning is never faster "
    "than its base. Beyond the noise: none/very low `o ≤ 5%`; low `5% < o ≤ 15%`; medium "
    "`15% < o ≤ 50%`; high `o > 50%`. A claim above none/very low is only called better than "
    "claimed when the noise floor is below the claimed level's lower bound; timings of a run on "
    "a busy machine are not judged.",
    "**Training stability**: high = no loss spike, step-to-step log-loss variability at most "
    "1.5× the median of all methods in the comparison, and (with several seeds) a final-loss "
    "coefficient of variation across seeds ≤ 10%; low = a non-finite loss or ≥ 3 spikes; "
    "medium otherwise.",
)
"""Each column's measured criterion, in Markdown; the report prints them under its table."""

# Document row → (registry name, trainable % range, memory, inference overhead, stability,
# method whose trainable count this one must exceed: DoRA's "0.1–1% + 权重维度" = LoRA's + m).
DOCUMENT_TABLE = [
    ("Full Fine-tuning", "full", (100.0, 100.0), "high", "none", "high", None),
    ("LoRA", "lora", (0.1, 1.0), "low", "very low", "high", None),
    ("QLoRA", "qlora", (0.1, 1.0), "very low", "very low", "medium", None),
    ("DoRA", "dora", (0.1, 1.0), "low", "low", "high", "lora"),
    ("Adapter", "adapter", (1.0, 3.0), "medium", "medium", "high", None),
    ("Prefix-Tuning", "prefix", (0.01, 0.1), "low", "low", "medium", None),
    ("P-Tuning v2", "ptuning-v2", (0.01, 0.1), "low", "low", "medium", None),
]
ORIGINAL_WORDS = {"high": "高", "medium": "中等", "low": "低", "very low": "极低", "none": "无"}

# Levels ordered from best to worst, per column; "none" and "very low" share the bottom rung of
# the overhead scale because timing cannot tell 0% from 3%.
MEMORY_ORDER = ["very low", "low", "medium", "high"]
OVERHEAD_ORDER = ["very low", "low", "medium", "high"]
STABILITY_ORDER = ["high", "medium", "low"]


def memory_level(total: float, full_total: float, smallest: float) -> str:
    q = total / full_total
    if q >= 0.9:
        return "high"
    if q >= 0.5:
        return "medium"
    return "very low" if total <= 1.05 * smallest else "low"


def overhead_level(o: float) -> str:
    if o <= 0.05:
        return "very low"
    if o <= 0.15:
        return "low"
    return "medium" if o <= 0.50 else "high"


def stability_level(stab: dict, median_var: float | None, seed_cv: float | None) -> str:
    var = stab.get("loss_variability")
    if stab.get("nonfinite") or stab.get("loss_spikes", 0) >= 3:
        return "low"
    calm = stab.get("loss_spikes", 0) == 0 and (
        var is None or median_var is None or var <= 1.5 * median_var
    )
    steady = seed_cv is None or seed_cv <= 0.10
    return "high" if calm and steady else "medium"


def verdict(measured: str, claimed: str, order: list[str]) -> str:
    claimed = "very low" if claimed == "none" and "very low" in order else claimed
    a, b = order.index(measured), order.index(claimed)
    return "held" if a == b else "better than claimed" if a < b else "worse than claimed"


def check_claims(summary: dict[str, dict]) -> list[dict]:
    """One row per claim of the document's table: claimed, measured, verdict, criterion.

    ``summary`` maps method → aggregated figures from :func:`peftlab.bench.report.summarize`
    (keys ``trainable_percent``, ``trainable_params``, ``memory_total_bytes``, ``deploy_overhead``,
    ``deploy_form``, ``stability``, ``seed_cv``).
    """
    ok = {m: s for m, s in summary.items() if s.get("status") == "ok"}
    totals = [s["memory_total_bytes"] for s in ok.values() if s.get("memory_total_bytes")]
    variabilities = [s["stability"].get("loss_variability") for s in ok.values()]
    variabilities = [v for v in variabilities if v is not None]
    median_var = statistics.median(variabilities) if variabilities else None
    rows: list[dict] = []
    for doc_name, method, (lo, hi), mem, ovh, stab, exceeds in DOCUMENT_TABLE:
        claimed_pct = f"{lo:g}–{hi:g}%" if lo != hi else f"{lo:g}%"
        if exceeds:
            claimed_pct += " + weight dimension"
        claimed = {
            "trainable params": claimed_pct,
            "memory": mem,
            "inference overhead": ovh,
            "training stability": stab,
        }
        s = ok.get(method)
        if s is None:
            why = "not in this comparison" if method not in summary else "run failed"
            judged = {column: (why, "not measured", "") for column in claimed}
        else:
            judged = {
                "trainable params": _judge_params(s, lo, hi, exceeds, ok),
                "memory": _judge_memory(s, mem, ok.get("full"), totals),
                "inference overhead": _judge_overhead(s, ovh),
                "training stability": _judge_stability(s, stab, median_var),
            }
        for column, (measured, result, criterion) in judged.items():
            rows.append(
                {
                    "method": method,
                    "document_row": doc_name,
                    "column": column,
                    "claimed": claimed[column],
                    "measured": measured,
                    "verdict": result,
                    "criterion": criterion,
                }
            )
    return rows


# Each judge returns (measured, verdict, criterion) for one cell of a measured method.


def _judge_params(s: dict, lo: float, hi: float, exceeds: str | None, ok: dict) -> tuple:
    pct = s["trainable_percent"]
    held = lo <= round(pct, 6) <= hi
    extra = ""
    if exceeds and exceeds in ok:
        more = s["trainable_params"] - ok[exceeds]["trainable_params"]
        held = held and more > 0
        extra = f"; {more:+,} vs {exceeds}"
    # More or fewer trainable parameters is neither better nor worse in itself.
    result = "held" if held else "below the range" if pct < lo else "above the range"
    return f"{pct:.4g}%{extra}", result, "measured % inside the stated range"


def _judge_memory(s: dict, claimed: str, full: dict | None, totals: list[float]) -> tuple:
    if full is None or not totals:
        return "needs full fine-tuning as reference", "not measured", ""
    q = s["memory_total_bytes"] / full["memory_total_bytes"]
    level = memory_level(s["memory_total_bytes"], full["memory_total_bytes"], min(totals))
    return (
        f"{level} ({q:.2f}× full)",
        verdict(level, claimed, MEMORY_ORDER),
        "total training memory / full's: high ≥0.9, medium ≥0.5, low <0.5, very low = low and "
        "smallest",
    )


OVERHEAD_LOWER = {"very low": 0.0, "low": 0.05, "medium": 0.15, "high": 0.50}
"""The smallest overhead each level allows (none shares very low's)."""


def _judge_overhead(s: dict, claimed: str) -> tuple:
    o = s.get("deploy_overhead")
    if o is None:
        return "not timed", "not measured", ""
    criterion = "slowdown vs base beyond the noise floor: ≤5% very low, ≤15% low, ≤50% medium"
    timing = s.get("deploy_timing") or {}
    if timing.get("reliable") is False:
        return f"{100 * o:+.1f}%, {s['deploy_form']}: {timing['why']}", "not judged", criterion
    finding, noise = timing.get("finding"), timing.get("noise")
    if finding in ("within noise", "faster"):
        level = "very low"
        where = "inside" if finding == "within noise" else "faster beyond"
        measured = f"very low ({100 * o:+.1f}%, {where} the noise floor ±{100 * noise:.1f}%, "
        measured += f"{s['deploy_form']})"
        wanted = "very low" if claimed == "none" else claimed
        if wanted != "very low" and noise >= OVERHEAD_LOWER[wanted]:
            # The noise spans the claimed level: no verdict can be built on it.
            return measured, "not separated from noise", criterion
        return measured, verdict(level, claimed, OVERHEAD_ORDER), criterion
    level = overhead_level(o)
    return (
        f"{level} ({100 * o:+.1f}%, {s['deploy_form']})",
        verdict(level, claimed, OVERHEAD_ORDER),
        criterion,
    )


def _judge_stability(s: dict, claimed: str, median_var: float | None) -> tuple:
    stab = s["stability"]
    level = stability_level(stab, median_var, s.get("seed_cv"))
    var = stab.get("loss_variability")
    spikes = f"{stab.get('loss_spikes', 0)} spikes"
    return (
        f"{level} ({spikes}, variability {var:.3f})" if var is not None else f"{level} ({spikes})",
        verdict(level, claimed, STABILITY_ORDER),
        "high: 0 spikes, variability ≤1.5× median of methods, seed CV ≤10%; low: ≥3 spikes or "
        "non-finite",
    )
