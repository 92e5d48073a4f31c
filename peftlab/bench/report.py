"""Turn comparison results into a terminal table, ``report.md`` and a self-contained
``report.html`` (figures embedded as base64 PNG; no network needed to read it).

Every measured number is a mean ± 95% interval over seeds (:mod:`peftlab.bench.summary`);
the findings (best method, verdicts, baselines) come first, then the measurements, the
search tables, the document's claims, the memory prediction and the definitions. A run whose
timings are unreliable (:mod:`peftlab.bench.timing`) has its speed and inference figures
marked so rather than stated as findings.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from peftlab.bench import claims as claims_mod
from peftlab.bench import measure, render
from peftlab.bench.figures import figures
from peftlab.bench.stats import Interval
from peftlab.bench.summary import compare_methods, summarize
from peftlab.bench.timing import UNRELIABLE
from peftlab.results import RunResult

__all__ = ["COLUMNS", "compare_methods", "figures", "summarize", "table_rows", "write_report"]

COLUMNS = [
    "method",
    "trainable params",
    "memory",
    "train speed",
    "inference overhead",
    "training stability",
    "quality",
    "status",
]


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _pct(o) -> str:
    return "–" if o is None else f"{100 * o:+.1f}%"


def _iv(s: dict, key: str, fmt: str = ".3f", scale: float = 1.0, unit: str = "") -> str | None:
    """``mean ± half (n=k)`` of ``s["intervals"][key]``, or None when there is none."""
    d = (s.get("intervals") or {}).get(key)
    if not d:
        return None
    if d["n"] == 1:  # one seed: the settings line says there are no intervals
        return format(d["mean"] * scale, fmt) + unit
    return Interval(d["mean"], d["ci95"], d["n"]).format(fmt, scale, unit)


def _memory_cell(s: dict) -> str:
    mib = 1 / 2**20
    total = _iv(s, "memory_total_bytes", ".1f", mib, " MiB")
    if total is None:
        return f"{_bytes(s['memory_total_bytes'])} (+{_bytes(s['memory_bytes'])})"
    return f"{total} (+{_iv(s, 'memory_bytes', '.1f', mib, ' MiB')} above the loaded model)"


def _speed_cell(s: dict) -> str:
    step = _iv(s, "step_time_s", ".3g", unit=" s/step")
    rate = _iv(s, "tokens_per_s", ".0f", unit=" tok/s")
    if step is None or rate is None:
        if s.get("step_time_s") is None or s.get("tokens_per_s") is None:
            return "–"
        step, rate = f"{s['step_time_s']:.2f} s/step", f"{s['tokens_per_s']:.0f} tok/s"
    cell = f"{step}; {rate}"
    timing = s.get("deploy_timing") or {}
    return f"{UNRELIABLE}: {cell}" if timing.get("reliable") is False else cell


def _overhead_cell(s: dict) -> str:
    ovh = f"{_pct(s['unmerged_overhead'])} unmerged"
    if s["merged_overhead"] is not None:
        ovh += f", {_pct(s['merged_overhead'])} merged"
    t = s.get("deploy_timing") or {}
    if t.get("reliable") is False:
        return f"{UNRELIABLE}: {ovh}"
    if t.get("finding"):
        ovh = f"{t['finding']} ({t['form']}, noise floor ±{100 * t['noise']:.1f}%): {ovh}"
    return ovh


def _quality_cell(s: dict) -> str:
    q = s.get("quality")
    text = _iv(s, "quality")
    if q and text:
        cell = f"{q['split']} {q['name'].replace('_', ' ')} {text}"
    else:
        cell = f"loss {s['eval_loss']:.3f}" if s.get("eval_loss") is not None else "–"
    return cell


def table_rows(summary: dict[str, dict]) -> list[list[str]]:
    """The document's columns (trainable params, memory, inference overhead, stability) plus
    speed and quality, as strings; every measurement a mean ± 95% interval over seeds."""
    rows = []
    for method, s in summary.items():
        if s["status"] == "failed":
            rows.append([method] + ["–"] * (len(COLUMNS) - 2) + [f"failed: {s['error']}"[:90]])
            continue
        var = s["stability"]["loss_variability"]
        stab = f"{s['stability']['loss_spikes']} spikes" + (
            f", var {var:.3f}" if var is not None else ""
        )
        if s["final_loss_spread"]:
            stab += f", seed std {s['final_loss_spread']['std']:.3f}"
        rows.append(
            [
                method,
                f"{s['trainable_params']:,} ({s['trainable_percent']:.3g}%)",
                _memory_cell(s),
                _speed_cell(s),
                _overhead_cell(s),
                stab,
                _quality_cell(s),
                s["status"],
            ]
        )
    return rows


TABLE_NOTE = (
    "mean ± 95% interval over seeds; memory: total to train (+ above the loaded model); "
    "inference overhead: slowdown vs the base model, judged against the run's noise floor; "
    "stability: loss spikes, log-loss variability (definitions in report.md)"
)


def print_table(summary: dict[str, dict]) -> None:
    """The table on the terminal: rich when stdout is a terminal, aligned plain text otherwise
    (logs, pipes), so nothing is wrapped or cut."""
    import sys

    rows = table_rows(summary)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is None or not sys.stdout.isatty():
        widths = [max(len(r[i]) for r in [COLUMNS] + rows) for i in range(len(COLUMNS))]
        for r in [COLUMNS] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(TABLE_NOTE)
        return
    t = Table(caption=TABLE_NOTE)
    for c in COLUMNS:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


# ---------------------------------------------------------------- settings and definitions


def _load_range(results: list[RunResult]) -> str:
    loads = [r.meta_info.load_average[0] for r in results if r.meta_info.load_average]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"


def _span(results: list[RunResult]) -> list[str]:
    stamps = [(r.run_info.start, r.run_info.end) for r in results]
    stamps = [
        (datetime.datetime.fromisoformat(a), datetime.datetime.fromisoformat(b))
        for a, b in stamps
        if a and b
    ]
    if not stamps:
        return []
    t0, t1 = min(a for a, _ in stamps), max(b for _, b in stamps)
    inside = sum((b - a).total_seconds() for a, b in stamps) / 60
    return [f"runs from {t0:%Y-%m-%d %H:%M} to {t1:%H:%M} UTC, {inside:.1f} min inside the workers"]


def _threads(results: list[RunResult]) -> str:
    threads = sorted({(r.meta_info.load or {}).get("threads") for r in results} - {None})
    why = {(r.meta_info.load or {}).get("threads_from") for r in results} - {None}
    if not threads:
        return ""
    return f"; torch threads per run {threads} ({', '.join(sorted(why))})"


def _settings(results: list[RunResult], comparison: dict | None = None) -> list[str]:
    ri, meta = results[0].run_info, results[0].meta_info
    v = meta.versions or {}
    seeds = sorted({r.run_info.seed for r in results if r.run_info.seed is not None})
    split = (comparison or {}).get("split")
    where = {
        "test": "the test split (scored once, after training)",
        "validation": "the validation split (the data has no test split: the same examples "
        "the training evaluates on, and with --tune the ones the search chose on)",
    }
    lines = [
        f"model `{ri.model}` ({ri.kind}), data `{ri.data}`, {ri.steps} steps × batch "
        f"{ri.batch_size} (max length {ri.max_length}), seeds {seeds}, device {ri.device}",
    ]
    if split:
        lines.append(f"quality is measured on {where[split]}")
    if len(seeds) < 2:
        lines.append("one seed per method: no intervals and no method is separated from another")
    return lines + [
        f"machine: {meta.host}, {meta.platform}, {meta.cpu_count} CPUs, "
        f"{meta.cuda_device or 'no GPU'}; 1-min load average at the runs' ends: "
        f"{_load_range(results)}{_threads(results)}",
        f"versions: peftlab {v.get('peftlab')}, torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, bitsandbytes {v.get('bitsandbytes')}",
        *_span(results),
    ]


DEFINITIONS = [
    "**intervals**: every measured number is the mean over seeds ± the half-width of its 95% "
    "Student-t interval (n = seeds; one seed has no interval). Two methods are called "
    "different only when the paired (same seeds) interval of their difference excludes 0; "
    "otherwise *not separated*.",
    "**memory**: total = the process's peak memory from right after the model loaded through "
    "training (data loading and `apply`, QLoRA's quantization included) minus the process's "
    "memory before the model loaded; in brackets, the peak above the RSS right after the model "
    "loaded (CPU: Linux VmHWM peak RSS; GPU: `torch.cuda.max_memory_allocated`).",
    f"**train speed**: per run, medians over the steps after the first {measure.WARMUP_STEPS}.",
    "**inference overhead**: slowdown against the base model timed in the same process on the "
    "same prompts: max(prefill latency ratio, 1 / decode tokens/s ratio) − 1. The base model "
    "is timed in two phases and every model in several rounds; the largest gap between two "
    "timings of one model is the run's noise floor, and a slowdown inside it is *within "
    "noise*. A merged adapter or full fine-tuning is never faster than its "
    "base.",
    "**unreliable (machine busy)**: the machine's load was read before, during and after each "
    "run; when other work used the cores (or the load changed between readings) the run's "
    "speed and inference timings are shown but not stated as findings.",
    f"**stability**: a spike is a logged loss above {measure.SPIKE_RATIO}× the median of the "
    f"{measure.SPIKE_WINDOW} before it; variability is the std of step-to-step change of "
    "log-loss; seed std is the spread of final eval loss across seeds.",
    "**baselines**: the majority class always answers the most frequent training label; the "
    "untrained base model is evaluated with no method applied (a classifier's head is new and "
    "random, so it scores chance). A method *beats* a baseline when the lower end of its "
    "quality's 95% interval is above the baseline (one seed: the Wilson interval over the "
    "split's examples).",
]


PREDICTION_HEADER = ["method", "predicted peak", "measured peak", "error"]
PREDICTION_NOTE = (
    "Predicted: `peftlab.estimate_memory` for each run's model, method config, batch size, "
    "longest padded batch, dtype and optimizer. Measured: the training loop's peak of live "
    "tensor memory (CUDA allocated bytes; on the CPU the C heap's live bytes, glibc "
    "mallinfo2), less what was live when the loop started that is not the model's tensors "
    "(runtime, tokenizer, tokenized data). Error = predicted / measured − 1."
)


def prediction_rows(summary: dict[str, dict]) -> list[list[str]]:
    """One row per method: the estimator's predicted training peak against the measured one."""
    rows = []
    for method, s in summary.items():
        pred, meas = s.get("memory_predicted_bytes"), s.get("memory_loop_bytes")
        if pred is None or not meas:
            continue
        rows.append([method, _bytes(pred), _bytes(meas), f"{pred / meas - 1:+.1%}"])
    return rows


CLAIMS_HEADER = ["document row", "column", "claimed", "measured", "verdict"]


# ---------------------------------------------------------------- the report


def write_report(out: str | Path, results: Sequence[RunResult | dict], echo: bool = True) -> dict:
    """Write ``report.md``, ``report.html``, ``summary.json`` and ``figures/*.png`` under
    ``out``; returns their paths, the summary, the claims and the method comparison."""
    from peftlab.bench.findings import headline, sections

    out = Path(out)
    results = [RunResult.coerce(r) for r in results]
    summary = summarize(results)
    comparison = compare_methods(summary)
    if echo:
        print_table(summary)
        for line in [headline(summary, comparison), *comparison["verdicts"]]:
            print(line.replace("**", ""))
    claim_rows = claims_mod.check_claims(summary)
    figs = figures(summary, comparison)
    (out / "figures").mkdir(exist_ok=True)
    for name, data in figs.items():
        (out / "figures" / f"{name}.png").write_bytes(data)
    settings = _settings(results, comparison)
    secs = sections(summary, claim_rows, comparison)
    (out / "report.md").write_text(render.markdown(settings, secs, figs))
    (out / "report.html").write_text(render.page(settings, secs, figs))
    (out / "summary.json").write_text(
        json.dumps(
            {"methods": summary, "comparison": comparison, "claims": claim_rows},
            indent=2,
            default=str,
        )
    )
    return {
        "report_md": str(out / "report.md"),
        "report_html": str(out / "report.html"),
        "summary": summary,
        "comparison": comparison,
        "claims": claim_rows,
    }


def _sections(summary: dict[str, dict], claim_rows: list[dict], comparison: dict | None = None):
    """The report's sections (see :mod:`peftlab.bench.render`)."""
    from peftlab.bench.findings import sections

    return sections(summary, claim_rows, comparison)


def _markdown(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    return render.markdown(settings, sections, figs)


def _html(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    return render.page(settings, sections, figs)
