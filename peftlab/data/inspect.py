"""What a training run will learn from, before it runs: counts, lengths and one example.

:func:`inspect_data` reads the data exactly as training does (:func:`load_task_data`: the
same sources, splits, truncation and drops) and reports, per split, how many examples were
read, truncated (longer than ``max_length``) and dropped (no response token left after
truncation), the token-length percentiles before truncation (nearest rank: the ``q``-th
percentile of ``n`` sorted lengths is the ``ceil(q/100 · n)``-th), the labels, the sources,
and one training example rendered with the tokens that carry loss between ``«`` and ``»``.
"""

from __future__ import annotations

import math
from collections import Counter

from peftlab.data.encode import IGNORE, SPLITS, TaskData
from peftlab.data.load import load_task_data
from peftlab.data.stream import load_streamed

PERCENTILES = (50, 90, 99, 100)
OPEN, CLOSE = "«", "»"


def percentile(values: list[int], q: float) -> int | None:
    """The nearest-rank ``q``-th percentile (``q`` in (0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def inspect_data(
    tokenizer,
    data,
    kind: str,
    max_length: int,
    example: int = 0,
    *,
    streaming: bool = False,
    shuffle_buffer: int = 10_000,
    sample: int = 1000,
    **kwargs,
) -> dict:
    """Read ``data`` as training would and describe it.

    Args:
        example: which training example to render.
        streaming: read as a ``streaming: true`` run does (:func:`load_streamed`): the
            held-out splits whole, the training split only as far as its first ``sample``
            examples (the order the run reads them, ``shuffle_buffer`` as its config says),
            so a file larger than memory is inspected without reading it through.
        kwargs: the other arguments of :func:`load_task_data` (``cfg.data_kwargs()``).

    Returns:
        ``kind``, ``max_length``, ``splits`` (per split: ``read``, ``truncated``, ``dropped``,
        ``kept``, ``lengths`` percentiles), ``empty`` (empty texts dropped), ``label_names``,
        ``labels`` (examples per label and split), ``sources``, ``example`` and ``sampled``
        (streaming: ``{"examples", "complete"}``, complete when the stream ended before
        ``sample``; else None).
    """
    if streaming:
        d = load_streamed(
            tokenizer, data, kind, max_length, shuffle_buffer=shuffle_buffer, **kwargs
        )
        train, counts = d.train.preview(max(1, sample))
        d.counts["train"] = {k: counts[k] for k in ("read", "truncated", "dropped", "kept")}
        d.lengths["train"] = [e["length"] for e in train]
        for pool, kept in zip(d.train.pools, counts["kept_by"]):
            d.sources[pool.source.name].update(train=kept, unique_train=kept)
        sampled = {"examples": len(train), "complete": len(train) < max(1, sample)}
    else:
        d = load_task_data(tokenizer, data, kind, max_length, **kwargs)
        train, sampled = d.train, None
    splits = {
        name: {
            **d.counts[name],
            "lengths": {f"p{q}": percentile(d.lengths[name], q) for q in PERCENTILES},
        }
        for name in SPLITS
    }
    labels = {}
    if kind == "classification":
        for name, examples in zip(SPLITS, (train, d.validation, d.test)):
            seen = Counter(d.label_names[e["label"]] for e in examples)
            labels[name] = {n: seen[n] for n in d.label_names if seen[n]}
    index = min(max(example, 0), len(train) - 1)
    return {
        "kind": kind,
        "max_length": max_length,
        "splits": splits,
        "empty": d.empty,
        "label_names": d.label_names,
        "labels": labels,
        "sources": d.sources,
        "sampled": sampled,
        "example": {"index": index, **render_example(tokenizer, d, train[index])},
    }


def render_example(tokenizer, data: TaskData, example: dict) -> dict:
    """``text`` (the example as the model reads it, loss-carrying tokens between « and »),
    ``tokens``, ``loss_tokens`` and ``source``."""
    ids = example["input_ids"]
    if data.kind == "classification":
        name = data.label_names[example["label"]]
        text = f"{tokenizer.decode(ids)}  {OPEN}label: {name}{CLOSE}"
        return {"text": text, "tokens": len(ids), "loss_tokens": 1, "source": example["source"]}
    # position t's label is the token at t, predicted from t-1: position 0 never carries loss
    marks = [i > 0 and lab != IGNORE for i, lab in enumerate(example["labels"])]
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or marks[i] != marks[start]:
            piece = tokenizer.decode(ids[start:i])
            parts.append(f"{OPEN}{piece}{CLOSE}" if marks[start] else piece)
            start = i
    return {
        "text": "".join(parts),
        "tokens": len(ids),
        "loss_tokens": sum(marks),
        "source": example["source"],
    }


def format_report(report: dict) -> str:
    """The report as lines of text for a terminal."""
    lines = [f"{report['kind']} data, max_length={report['max_length']}"]
    head = ["split", "read", "truncated", "dropped", "kept"] + [f"p{q}" for q in PERCENTILES]
    rows = [head]
    for name, s in report["splits"].items():
        pct = [s["lengths"][f"p{q}"] for q in PERCENTILES]
        rows.append([name, s["read"], s["truncated"], s["dropped"], s["kept"]] + pct)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append(
            "  ".join(str(v if v is not None else "-").rjust(w) for v, w in zip(r, widths))
        )
    lines.append(
        "(read: examples given to the tokenizer; truncated: longer than max_length; dropped: no "
        "response token left after truncation; p50..p100: tokens before truncation)"
    )
    if report.get("sampled"):
        n = report["sampled"]["examples"]
        lines.append(
            f"streamed: the train row counts the records read for its first {n} examples, in "
            f"the order the run reads them"
            + (
                " (all there are)"
                if report["sampled"]["complete"]
                else "; the file was not read through"
            )
        )
    if report["empty"]:
        lines.append(f"empty texts dropped before the split: {report['empty']}")
    if report["label_names"]:
        lines.append(f"labels: {', '.join(report['label_names'])}")
        for name, counts in report["labels"].items():
            if counts:
                lines.append(f"  {name}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    lines.append("sources:")
    for name, s in report["sources"].items():
        unique = s["unique_train"]
        repeated = f" ({unique} unique)" if unique and unique < s["train"] else ""
        weight = f"weight {s['weight']}, " if s["weight"] is not None else ""
        lines.append(
            f"  {name}: {weight}train {s['train']}{repeated}, validation {s['validation']}, "
            f"test {s['test']}" + (f", empty {s['empty']}" if s["empty"] else "")
        )
    ex = report["example"]
    lines.append(
        f"training example {ex['index']} (source {ex['source']}): {ex['tokens']} tokens, "
        f"loss on {ex['loss_tokens']} (marked {OPEN}...{CLOSE}):"
    )
    lines.append(ex["text"])
    return "\n".join(lines)
