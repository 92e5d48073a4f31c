"""The estimator against comparison runs: every method on the bundled SmolLM2, two batch sizes.

    python -m benchmarks.estimator_compare                    # batch 2 and 8, writes docs/results/
    python -m benchmarks.estimator_compare --batches 4 --out /tmp/est --doc /tmp/est.md

For each batch size this runs ``peftlab compare`` (every method in its own process, resumable:
finished runs are kept) and reads, from each run's result, the estimator's predicted training
peak next to the measured one (``train_info.peak_memory.prediction``, written by the compare
worker; see ``peftlab.bench.worker.memory_prediction``). It writes one table with the error of
every run and the largest error, against the issue's 15%.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 0.15


def run_compare(batch: int, out: Path, args) -> None:
    cmd = [
        sys.executable, "-m", "peftlab.cli", "compare", "--model", args.model, "--quick",
        "--steps", str(args.steps), "--batch-size", str(batch), "--out", str(out),
        "--threads", str(args.threads), "--retry-failed",
    ]  # fmt: skip
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=False, cwd=ROOT)


def rows_of(out: Path, batch: int) -> list[dict]:
    rows = []
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        if "train_info" not in result:
            continue  # plan.json, summary.json
        info = result["train_info"]
        pred = info.get("peak_memory", {}).get("prediction", {})
        # The loop's own peak: train_info.peak_memory.loop (results written before the
        # trainer stopped measuring kept it in train_summary.peak_memory).
        loop = info.get("peak_memory", {}).get("loop") or (info.get("train_summary") or {}).get(
            "peak_memory", {}
        )
        rows.append(
            {
                "method": result["run_info"]["method"],
                "batch": batch,
                "status": info.get("status"),
                "seq_len": pred.get("seq_len"),
                "predicted_bytes": pred.get("predicted_bytes"),
                "measured_bytes": pred.get("measured_bytes"),
                "error": pred.get("error_ratio"),
                "other_bytes": pred.get("other_live_bytes"),
                "rss_peak_bytes": loop.get("bytes"),
            }
        )
    return rows


def write_doc(rows: list[dict], path: Path, argv: list[str]) -> float | None:
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    worst = max(errors) if errors else None
    mb = 1e6
    lines = [
        "# Memory estimator vs comparison runs (SmolLM2-135M, CPU)",
        "",
        f"Command: `python -m benchmarks.estimator_compare {' '.join(argv)}` "
        f"(`peftlab compare --quick` per batch size). Machine: {platform.machine()}, "
        f"Python {platform.python_version()}.",
        "",
        "Predicted: `peftlab.estimate_memory` for the run's model, method config, batch size, "
        "longest padded batch (`seq`), float32 and AdamW. Measured: the training loop's peak "
        "of live heap bytes (glibc `mallinfo2`, sampled every millisecond: the CPU's "
        "counterpart of `torch.cuda.max_memory_allocated`), less what was live when the loop "
        "started that is not the model's tensors (the runtime, tokenizer and tokenized data: "
        "`other MB`). Error = predicted / measured − 1. RSS peak is the "
        "process's peak resident set over the loop, for reference: it includes the runtime "
        "and freed memory glibc keeps.",
        "",
        "| method | batch | seq | predicted MB | measured MB | error | other MB | RSS peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["predicted_bytes"] is None or not r["measured_bytes"]:
            lines.append(f"| {r['method']} | {r['batch']} | – | – | – | {r['status']} | – | – |")
            continue
        rss = f"{r['rss_peak_bytes'] / mb:,.0f}" if r["rss_peak_bytes"] else "–"
        other = f"{r['other_bytes'] / mb:,.0f}" if r["other_bytes"] is not None else "–"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['seq_len']} | {r['predicted_bytes'] / mb:,.0f} "
            f"| {r['measured_bytes'] / mb:,.0f} | {r['error']:+.1%} | {other} | {rss} |"
        )
    if worst is not None:
        within = sum(e <= LIMIT for e in errors)
        lines += [
            "",
            f"Largest error: {worst:.1%}; {within} of {len(errors)} runs within "
            f"{LIMIT:.0%} ({'all within' if within == len(errors) else 'NOT all within'}).",
        ]
    path.write_text("\n".join(lines) + "\n")
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", default="2,8", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="/tmp/peftlab-estimator-compare", help="compare runs go here")
    p.add_argument("--doc", default=str(ROOT / "docs/results/estimator_compare.md"))
    p.add_argument("--report-only", action="store_true", help="read the runs, run nothing")
    args = p.parse_args(argv)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        out = Path(args.out) / f"batch{batch}"
        if not args.report_only:
            run_compare(batch, out, args)
        rows += rows_of(out, batch)
    doc = Path(args.doc)
    worst = write_doc(rows, doc, argv)
    doc.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(doc.read_text())
    return 0 if worst is not None and worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
