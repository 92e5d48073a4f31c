"""Turn comparison results into a terminal table, ``report.md`` and a self-contained
``report.html`` (figures embedded as base64 PNG; no network needed to read it)."""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from peftlab.bench import claims as claims_mod
from peftlab.bench import measure
from peftlab.results import RunResult, quality

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


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: Sequence[RunResult | dict]) -> dict[str, dict]:
    """Method → figures aggregated over its seeds (medians of measurements, means of quality,
    cross-seed spread of final loss and quality). ``metric_name``/``metric`` are the runs'
    :func:`~peftlab.results.quality`; :func:`~peftlab.bench.claims.check_claims` reads the
    rest."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in map(RunResult.coerce, results):
        by_method[r.method].append(r)
    out: dict[str, dict] = {}
    for method, runs in by_method.items():
        ok = [r for r in runs if r.ok]
        if not ok:
            out[method] = {
                "status": "failed",
                "error": runs[0].train_info.error,
                "seeds": len(runs),
            }
            continue
        out[method] = _summarize_ok(ok, len(runs))
    return out


def _summarize_ok(runs: list[RunResult], n_runs: int) -> dict:
    """The figures of one method from its successful runs (of ``n_runs``)."""
    infos = [r.train_info for r in runs]
    first = infos[0]
    qualities = [quality(r) for r in runs]
    named = next((q for q in qualities if q is not None), None)
    metrics = [q.value if q and named and q.name == named.name else None for q in qualities]
    finals = [(t.eval or {}).get("eval_loss", t.final_loss) for t in infos]
    loss_spread = measure.spread(finals)
    unmerged = [t.inference.unmerged_vs_base for t in infos]
    merged = [t.inference.merged_vs_base for t in infos]
    deploy_form = "merged" if first.mergeable and merged[0] else "unmerged"
    deploy = [
        claims_mod.overhead_fraction(m if deploy_form == "merged" else u)
        for u, m in zip(unmerged, merged)
    ]
    memory = [t.peak_memory for t in infos]
    predictions = [m.prediction for m in memory if m.prediction is not None]
    return {
        "status": "ok" if len(runs) == n_runs else "partly failed",
        "seeds": n_runs,
        "trainable_params": first.trainable_params,
        "total_params": first.total_params,
        "trainable_percent": first.trainable_percent,
        "adapter_bytes": first.adapter_bytes,
        "memory_bytes": _median(m.bytes for m in memory),
        "memory_total_bytes": _median(m.total_bytes for m in memory),
        "memory_predicted_bytes": _median(p.predicted_bytes for p in predictions),
        "memory_loop_bytes": _median(p.measured_bytes for p in predictions),
        "step_time_s": _median(t.step_time_median_s for t in infos),
        "tokens_per_s": _median(t.tokens_per_s for t in infos),
        "unmerged_overhead": _median(claims_mod.overhead_fraction(u) for u in unmerged),
        "merged_overhead": _median(claims_mod.overhead_fraction(m) for m in merged),
        "deploy_overhead": _median(deploy),
        "deploy_form": deploy_form,
        "stability": {
            "loss_spikes": max(t.stability.loss_spikes for t in infos),
            "loss_variability": _median(t.stability.loss_variability for t in infos),
        },
        "final_loss_spread": loss_spread,
        "metric_spread": measure.spread(metrics),
        "seed_cv": loss_spread["std"] / loss_spread["mean"]
        if loss_spread and loss_spread["mean"]
        else None,
        "eval_loss": _median((t.eval or {}).get("eval_loss") for t in infos),
        "eval_ppl": _median((t.eval or {}).get("eval_ppl") for t in infos),
        # The quality (see peftlab.results.quality) averaged over seeds.
        "metric_name": named.name if named else None,
        "metric_higher_is_better": named.higher_is_better if named else None,
        "metric": statistics.fmean([m for m in metrics if m is not None])
        if any(m is not None for m in metrics)
        else None,
        "loss_curves": [t.loss_curve for t in infos],
    }


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


def table_rows(summary: dict[str, dict]) -> list[list[str]]:
    """The document's columns (trainable params, memory, inference overhead, stability) plus speed
    and quality, as strings."""
    rows = []
    for method, s in summary.items():
        if s["status"] == "failed":
            rows.append([method] + ["–"] * (len(COLUMNS) - 2) + [f"failed: {s['error']}"[:70]])
            continue
        ovh = f"{_pct(s['unmerged_overhead'])} unmerged"
        if s["merged_overhead"] is not None:
            ovh += f", {_pct(s['merged_overhead'])} merged"
        var = s["stability"]["loss_variability"]
        stab = (
            f"{s['stability']['loss_spikes']} spikes, var {var:.3f}"
            if var is not None
            else f"{s['stability']['loss_spikes']} spikes"
        )
        if s["final_loss_spread"]:
            stab += f", seed std {s['final_loss_spread']['std']:.3f}"
        quality = f"loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else "–"
        if s["metric"] is not None and s["metric_name"] != "loss":
            quality += f", {s['metric_name']} {s['metric']:.3f}"
        speed = (
            f"{s['step_time_s']:.2f} s/step, {s['tokens_per_s']:.0f} tok/s"
            if s["step_time_s"] is not None and s["tokens_per_s"] is not None
            else "–"
        )
        rows.append(
            [
                method,
                f"{s['trainable_params']:,} ({s['trainable_percent']:.3g}%)",
                f"{_bytes(s['memory_total_bytes'])} (+{_bytes(s['memory_bytes'])})",
                speed,
                ovh,
                stab,
                quality,
                s["status"],
            ]
        )
    return rows


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


TABLE_NOTE = (
    "memory: total to train (+ above the loaded model); inference overhead: slowdown vs the base "
    "model; stability: loss spikes, log-loss variability (definitions in report.md)"
)


# ---------------------------------------------------------------- figures


def figures(summary: dict[str, dict]) -> dict[str, bytes]:
    """PNG bytes of: loss curves, memory bars, speed bars, trainable params vs quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {m: s for m, s in summary.items() if s["status"] != "failed"}
    out: dict[str, bytes] = {}
    if not ok:
        return out

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in ok.items():
        for i, curve in enumerate(s["loss_curves"]):
            if curve:
                steps, losses = zip(*curve)
                ax.plot(steps, losses, label=m if i == 0 else None, alpha=1.0 if i == 0 else 0.4)
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves", yscale="log")
    ax.legend(fontsize=8)
    out["loss_curves"] = png(fig)

    names = list(ok)
    fig, ax = plt.subplots(figsize=(7, 4))
    total = [(ok[m]["memory_total_bytes"] or 0) / 2**20 for m in names]
    above = [(ok[m]["memory_bytes"] or 0) / 2**20 for m in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], total, width=0.4, label="total to train")
    ax.bar([i + 0.2 for i in x], above, width=0.4, label="above loaded model")
    ax.set_xticks(list(x), names, rotation=30)
    ax.set(ylabel="MiB", title="Peak training memory")
    ax.legend(fontsize=8)
    out["memory"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [ok[m]["tokens_per_s"] or 0 for m in names])
    ax.set(ylabel="training tokens/s (median after warm-up)", title="Training speed")
    ax.tick_params(axis="x", rotation=30)
    out["speed"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    key = next((s["metric_name"] for s in ok.values() if s["metric"] is not None), None)
    for m, s in ok.items():
        y = s["metric"] if s["metric_name"] == key else None
        if y is not None:
            ax.scatter(s["trainable_params"], y)
            ax.annotate(m, (s["trainable_params"], y), fontsize=8)
    ax.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="eval loss (lower is better)" if key == "loss" else key or "quality",
        title="Trainable parameters vs quality",
    )
    out["params_vs_quality"] = png(fig)
    return out


# ---------------------------------------------------------------- documents


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _load_range(results: list[RunResult]) -> str:
    loads = [r.meta_info.load_average[0] for r in results if r.meta_info.load_average]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"


def _settings(results: list[RunResult]) -> list[str]:
    ri, meta = results[0].run_info, results[0].meta_info
    v = meta.versions or {}
    seeds = sorted({r.run_info.seed for r in results if r.run_info.seed is not None})
    import datetime

    stamps = [(r.run_info.start, r.run_info.end) for r in results]
    stamps = [(a, b) for a, b in stamps if a and b]
    span = ""
    if stamps:
        t0 = min(datetime.datetime.fromisoformat(a) for a, _ in stamps)
        t1 = max(datetime.datetime.fromisoformat(b) for _, b in stamps)
        runs_s = sum(
            (
                datetime.datetime.fromisoformat(b) - datetime.datetime.fromisoformat(a)
            ).total_seconds()
            for a, b in stamps
        )
        span = f"runs from {t0:%Y-%m-%d %H:%M} to {t1:%H:%M} UTC, {runs_s / 60:.1f} min inside the workers"
    return [
        f"model `{ri.model}` ({ri.kind}), data `{ri.data}`, {ri.steps} steps × batch "
        f"{ri.batch_size} (max length {ri.max_length}), seeds {seeds}, device {ri.device}",
        f"machine: {meta.host}, {meta.platform}, {meta.cpu_count} CPUs, "
        f"{meta.cuda_device or 'no GPU'}; 1-min load average at the runs' ends: {_load_range(results)}",
        f"versions: peftlab {v.get('peftlab')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"bitsandbytes {v.get('bitsandbytes')}",
    ] + ([span] if span else [])


DEFINITIONS = [
    "**memory**: total = the process's peak memory from right after the model loaded through "
    "training (data loading and `apply`, QLoRA's quantization included) minus the process's "
    "memory before the model loaded; in brackets, the peak above the RSS right after the model loaded (CPU: Linux "
    "VmHWM peak RSS; GPU: `torch.cuda.max_memory_allocated`).",
    f"**train speed**: medians over the steps after the first {measure.WARMUP_STEPS}.",
    "**inference overhead**: slowdown against the base model timed in the same process on the same "
    "prompts: max(prefill latency ratio, 1 / decode tokens/s ratio) − 1.",
    f"**stability**: a spike is a logged loss above {measure.SPIKE_RATIO}× the median of the "
    f"{measure.SPIKE_WINDOW} before it; variability is the std of step-to-step change of log-loss; "
    "seed std is the spread of final eval loss across seeds.",
]


PREDICTION_HEADER = ["method", "predicted peak", "measured peak", "error"]
PREDICTION_NOTE = (
    "Predicted: `peftlab.estimate_memory` for each run's model, method config, batch size, "
    "longest padded batch, dtype and optimizer. Measured: the training loop's peak of live "
    "tensor memory (CUDA allocated bytes; on the CPU the C heap's live bytes, glibc "
    "mallinfo2), less what was live when the loop started that is not the model's tensors "
    "(runtime, tokenizer, tokenized data). Error = "
    "predicted / measured − 1."
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


def write_report(out: str | Path, results: Sequence[RunResult | dict], echo: bool = True) -> dict:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` under ``out``; returns their paths."""
    import json

    out = Path(out)
    results = [RunResult.coerce(r) for r in results]
    summary = summarize(results)
    if echo:
        print_table(summary)
    claim_rows = claims_mod.check_claims(summary)
    figs = figures(summary)
    (out / "figures").mkdir(exist_ok=True)
    for name, data in figs.items():
        (out / "figures" / f"{name}.png").write_bytes(data)
    settings, sections = _settings(results), _sections(summary, claim_rows)
    (out / "report.md").write_text(_markdown(settings, sections, figs))
    (out / "report.html").write_text(_html(settings, sections, figs))
    (out / "summary.json").write_text(
        json.dumps({"methods": summary, "claims": claim_rows}, indent=2, default=str)
    )
    return {
        "report_md": str(out / "report.md"),
        "report_html": str(out / "report.html"),
        "summary": summary,
        "claims": claim_rows,
    }


def _sections(summary: dict[str, dict], claim_rows: list[dict]) -> list[tuple[str, list]]:
    """The report's sections as ``(title, blocks)``; a block is ``("table", header, rows)``,
    ``("list", items)`` or ``("text", paragraph)``, items and paragraphs in Markdown."""
    words = claims_mod.ORIGINAL_WORDS
    claim_table = [
        [
            c["document_row"],
            c["column"],
            f"{c['claimed']} ({words[c['claimed']]})" if c["claimed"] in words else c["claimed"],
            c["measured"],
            c["verdict"],
        ]
        for c in claim_rows
    ]
    sections = [
        ("Measured", [("table", COLUMNS, table_rows(summary))]),
        (
            "The document's table, checked",
            [
                ("table", CLAIMS_HEADER, claim_table),
                ("text", "Criteria (from `peftlab/bench/claims.py`):"),
                ("list", list(claims_mod.CRITERIA)),
            ],
        ),
    ]
    predicted = prediction_rows(summary)
    if predicted:
        sections.append(
            (
                "Memory: predicted before the run vs measured",
                [("table", PREDICTION_HEADER, predicted), ("text", PREDICTION_NOTE)],
            )
        )
    sections.append(("Definitions", [("list", DEFINITIONS)]))
    failures = [f"`{m}`: {s['error']}" for m, s in summary.items() if s["status"] == "failed"]
    if failures:
        sections.append(("Failed runs", [("list", failures)]))
    return sections


def _markdown(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    md = ["# peftlab compare — report", ""] + [f"- {s}" for s in settings] + [""]
    for title, blocks in sections:
        md += [f"## {title}", ""]
        for kind, *body in blocks:
            if kind == "table":
                md += [_md_table(*body), ""]
            elif kind == "list":
                md += [f"- {item}" for item in body[0]] + [""]
            else:
                md += [body[0], ""]
    md += ["## Figures", ""] + [f"![{n}](figures/{n}.png)" for n in figs] + [""]
    return "\n".join(md)


def _html(settings: list[str], sections: list[tuple[str, list]], figs: dict) -> str:
    """A self-contained page: figures inline as base64 PNG, nothing fetched from elsewhere."""
    esc = html.escape

    def block(kind, *body) -> str:
        if kind == "table":
            head = "".join(f"<th>{esc(c)}</th>" for c in body[0])
            trs = "".join(
                "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in body[1]
            )
            return f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"
        if kind == "list":
            return "<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in body[0]) + "</ul>"
        return f"<p>{esc(body[0])}</p>"

    parts = [block("list", settings)]
    for title, blocks in sections:
        parts.append(f"<h2>{esc(title)}</h2>" + "".join(block(*b) for b in blocks))
    imgs = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(d).decode()}">'
        f"<figcaption>{n.replace('_', ' ')}</figcaption></figure>"
        for n, d in figs.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:80em}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}th{background:#eee}"
        "figure{display:inline-block;margin:1em}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>peftlab compare — report'
        f"</title>\n<style>{style}</style>\n</head><body><h1>peftlab compare — report</h1>\n"
        + "\n".join(parts)
        + f"\n<h2>Figures</h2>{imgs}\n</body></html>\n"
    )
