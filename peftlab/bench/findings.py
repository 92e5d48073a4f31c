"""The report's sections: findings first (best method, verdicts, baselines, timing
reliability), then the measurements, the searches, the document's claims, the memory
prediction and the definitions. Text is Markdown inline (see :mod:`peftlab.bench.render`)."""

from __future__ import annotations

from peftlab.bench import claims as claims_mod
from peftlab.bench.stats import Interval


def _name(comparison: dict) -> str:
    return f"{comparison['split']} {comparison['quality'].replace('_', ' ')}"


def _interval_text(s: dict) -> str:
    d = (s.get("intervals") or {}).get("quality")
    return Interval(d["mean"], d["ci95"], d["n"]).format() if d else "–"


def headline(summary: dict[str, dict], comparison: dict) -> str:
    """One sentence naming the best method by quality."""
    if not comparison.get("best"):
        return "No method produced a quality figure."
    best = comparison["best"]
    better = "higher" if comparison["higher_is_better"] else "lower"
    others = comparison.get("unseparated") or []
    if others:  # the highest mean, but not a winner: say so in the same sentence
        return (
            f"Highest mean {_name(comparison)} ({better} is better): {best}, "
            f"{_interval_text(summary[best])}; not separated from {', '.join(others)}, so "
            f"there is no single best method."
        )
    return (
        f"Best by {_name(comparison)} ({better} is better): **{best}**, "
        f"{_interval_text(summary[best])}."
    )


def _baseline_lines(comparison: dict) -> list[tuple[str, list]]:
    words = {"majority": "the majority class", "base_model": "the untrained base model"}
    blocks: list[tuple[str, list]] = []
    for key, b in (comparison.get("baselines") or {}).items():
        if not b:
            continue
        what = f"{words[key]} ({_name(comparison)} {b['value']:.3f}"
        what += f"; {b['note']})" if b.get("note") else ")"
        undecided = [m for m, v in b["methods"].items() if v["beats"] is None]
        losers = [m for m, v in b["methods"].items() if v["beats"] is False]
        if b["all_beat"]:
            end, side = ("lower", "above") if comparison["higher_is_better"] else ("upper", "below")
            text = (
                f"Every method beats {what}: the {end} end of each one's 95% interval is {side} it."
            )
        elif losers:
            verb = "does" if len(losers) == 1 else "do"
            text = f"Not every method beats {what}: {', '.join(losers)} {verb} not."
        else:
            text = f"Whether every method beats {what} cannot be told: no interval for "
            text += f"{', '.join(undecided)}."
        items = []
        for m, v in b["methods"].items():
            if v["low"] is None:
                items.append(f"{m}: no interval ({v['how']})")
                continue
            word = "beats it" if v["beats"] else "does not beat it"
            items.append(
                f"{m}: 95% interval [{v['low']:.3f}, {v['high']:.3f}] ({v['how']}), {word}"
            )
        blocks += [("text", text), ("list", items)]
    return blocks


def _timing_lines(summary: dict[str, dict]) -> list[tuple[str, list]]:
    busy = [
        f"{m}: {s['deploy_timing']['why']}"
        for m, s in summary.items()
        if (s.get("deploy_timing") or {}).get("reliable") is False
    ]
    if not busy:
        return []
    return [
        (
            "text",
            "Timings of these methods are not stated as findings (speed and inference "
            "overhead are shown, marked):",
        ),
        ("list", busy),
    ]


def _setting(candidate: dict) -> str:
    """``lr=0.001, r=8``."""
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in candidate.items()
    )


def _tuning_blocks(summary: dict[str, dict]) -> list[tuple[str, list]]:
    notes, rows = [], []
    for m, s in summary.items():
        t = s.get("tuning")
        if not t:
            continue
        chosen = t.get("chosen")
        if chosen is None and t.get("error"):
            notes.append(f"{m}: search failed ({t['error']})")
        elif chosen is None:
            notes.append(f"{m}: {t.get('note')}")
        else:
            setting = _setting(chosen)
            trials = (t.get("search") or {}).get("trials", [])
            if any(tr.get("beyond_grid") and tr["candidate"] == chosen for tr in trials):
                setting += ", past the declared grid's edge"
            notes.append(f"{m}: chose {setting} ({t.get('note')}; score: {t.get('score')})")
        for tr in (t.get("search") or {}).get("trials", []):
            score = f"{tr['score']:.3f}" if tr.get("score") is not None else "–"
            past = " (past the grid's edge)" if tr.get("beyond_grid") else ""
            rows.append([m, tr["rung"], tr["steps"], _setting(tr["candidate"]) + past, score,
                         "yes" if tr["kept"] else "", tr.get("error") or ""])  # fmt: skip
    if not notes:
        return []
    header = ["method", "rung", "steps", "candidate", "validation score", "kept", "error"]
    return [("list", notes)] + ([("table", header, rows)] if rows else [])


def _claims_table(claim_rows: list[dict]) -> list[list[str]]:
    words = claims_mod.ORIGINAL_WORDS
    return [
        [
            c["document_row"],
            c["column"],
            f"{c['claimed']} ({words[c['claimed']]})" if c["claimed"] in words else c["claimed"],
            c["measured"],
            c["verdict"],
        ]
        for c in claim_rows
    ]


def sections(
    summary: dict[str, dict], claim_rows: list[dict], comparison: dict | None = None
) -> list[tuple[str, list]]:
    """The report's sections as ``(title, blocks)``."""
    from peftlab.bench.report import (
        CLAIMS_HEADER,
        COLUMNS,
        DEFINITIONS,
        PREDICTION_HEADER,
        PREDICTION_NOTE,
        TABLE_NOTE,
        prediction_rows,
        table_rows,
    )
    from peftlab.bench.summary import compare_methods

    comparison = comparison if comparison is not None else compare_methods(summary)
    out: list[tuple[str, list]] = []
    found = [("text", headline(summary, comparison))]
    if comparison.get("verdicts"):
        found.append(("list", comparison["verdicts"]))
    found += _baseline_lines(comparison) + _timing_lines(summary)
    out.append(("Findings", found))
    out.append(("Measured", [("table", COLUMNS, table_rows(summary)), ("text", TABLE_NOTE)]))
    tuning = _tuning_blocks(summary)
    if tuning:
        out.append(("Tuning: each method's own search", tuning))
    out.append(
        (
            "The document's table, checked",
            [
                ("table", CLAIMS_HEADER, _claims_table(claim_rows)),
                ("text", "Criteria (from `peftlab/bench/claims.py`):"),
                ("list", list(claims_mod.CRITERIA)),
            ],
        )
    )
    predicted = prediction_rows(summary)
    if predicted:
        out.append(
            (
                "Memory: predicted before the run vs measured",
                [("table", PREDICTION_HEADER, predicted), ("text", PREDICTION_NOTE)],
            )
        )
    out.append(("Definitions", [("list", DEFINITIONS)]))
    failures = [f"`{m}`: {s['error']}" for m, s in summary.items() if s["status"] == "failed"]
    if failures:
        out.append(("Failed runs", [("list", failures)]))
    return out
