"""`peftlab compare --tune lr --quick` on SST-2 with MiniLM: wall time on an idle machine and
beside one other CPU-bound process, side by side in one run (#15: ≤ 10 min idle, ≤ 2.5× that
when loaded).

    python -m benchmarks.compare_load                      # idle, loaded; 1 repeat
    python -m benchmarks.compare_load --repeats 2 --order loaded,idle
    python -m benchmarks.compare_load --data ../shared/data/sst2 --methods lora,prompt

Each measurement runs the real command line in a fresh process (``python -m peftlab.cli
compare ...``) with its own output directory. "loaded" starts one process that spins a core
(``while True: pass``, outside the compare's process tree) a second before, and stops it after.
Printed per run: wall seconds, the threads compare chose and the load it recorded (from its
``summary.json``), whether its report marked timings unreliable; then the loaded/idle ratio
of the medians. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT

SPIN = "while True: pass"


def command(data: Path, out: Path, methods: str | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "peftlab.cli", "compare", "--model", "minilm-l6",
        "--data", str(data / "train.tsv"), "--quick", "--tune", "lr", "--out", str(out),
        "--train", f"eval_data={data / 'dev.tsv'}", "--train", "text_column=sentence",
        "--train", "data_size=2000", "--train", "eval_size=200", "--train", "test_size=200",
    ]  # fmt: skip
    return cmd + (["--methods", methods] if methods else [])


def run_once(data: Path, methods: str | None, loaded: bool) -> dict:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if loaded else None
    try:
        time.sleep(1.0 if loaded else 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cmp"
            t0 = time.perf_counter()
            proc = subprocess.run(
                command(data, out, methods), cwd=ROOT, capture_output=True, text=True
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise SystemExit(f"compare failed (exit {proc.returncode}): {' | '.join(tail)}")
            return {"wall_s": wall, **_conditions(out)}
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def _conditions(out: Path) -> dict:
    """Threads and load as compare recorded them, and whether it trusted its timings."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "plan.json"]
    loads = [r.get("meta_info", {}).get("load") or {} for r in runs if "train_info" in r]
    threads = sorted({x.get("threads") for x in loads} - {None})
    busy = [(x.get("before_run") or {}).get("other_busy_cores") for x in loads]
    timing = [r["train_info"].get("timing") or {} for r in runs if "train_info" in r]
    return {
        "threads": threads,
        "other_busy_cores": max((b for b in busy if b is not None), default=None),
        "timings_unreliable": [t["why"] for t in timing if t.get("reliable") is False],
        "runs": len(loads),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sst2")
    ap.add_argument("--methods", default=None, help="default: every method")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--order", default="idle,loaded")
    a = ap.parse_args(argv)
    if not (a.data / "train.tsv").is_file():
        print(f"SST-2 not found at {a.data} (see its SOURCE.md); nothing measured")
        return 0
    walls: dict[str, list[float]] = {"idle": [], "loaded": []}
    for rep in range(a.repeats):
        for kind in a.order.split(","):
            r = run_once(a.data, a.methods, loaded=kind == "loaded")
            walls[kind].append(r["wall_s"])
            print(f"repeat {rep + 1} {kind:6s}: {r['wall_s'] / 60:.2f} min  {json.dumps(r)}")
    med = {k: statistics.median(v) for k, v in walls.items() if v}
    spread = {k: f"{min(v) / 60:.2f}–{max(v) / 60:.2f} min" for k, v in walls.items() if v}
    print(f"medians { ({k: round(v / 60, 2) for k, v in med.items()}) } min (ranges {spread})")
    if len(med) == 2:
        print(f"loaded/idle {med['loaded'] / med['idle']:.2f}× (target ≤ 2.5×; idle ≤ 10 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
