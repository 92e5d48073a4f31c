"""Shared machinery for the benchmarks: one process per configuration, turns, medians, memory.

Why one process per configuration: measured inside one process, two copies of the same code
differed by ~10% (allocator state, caches, thread pools warmed by whoever ran first); in
separate processes they agreed within 3%. So a driver spawns ``<script> --config NAME`` for
every configuration, in a new shuffled order each repeat, and takes medians over repeats.

A worker prints its result as one JSON line prefixed with ``RESULT`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "RESULT "


# -- memory --------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+)\s+kB", text)
    return int(m.group(1)) if m else None


def rss_gb() -> float | None:
    """Current resident set size in GB (Linux), else None."""
    kb = _status_kb("VmRSS")
    return kb / 1e6 if kb is not None else None


def peak_rss_gb() -> float | None:
    """Peak RSS since the process started or since :func:`reset_peak_rss`, in GB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return kb / 1e6


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so a phase can be measured on its own.

    Writing 5 to ``/proc/self/clear_refs`` does that on Linux >= 4.0. Returns False elsewhere.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- driver --------------------------------------------------------------------------------
def run_worker(script: str, config: str, args: Sequence[str], timeout: float) -> dict:
    """Run ``python -m benchmarks.<script> --config NAME args...`` and parse its RESULT line."""
    cmd = [sys.executable, "-m", f"benchmarks.{script}", "--config", config, *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"config": config, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def drive(
    script: str,
    configs: Sequence[str],
    repeats: int,
    worker_args: Sequence[str],
    timeout: float = 900,
    seed: int = 0,
    log: Callable[[str], None] = print,
    budget_s: float | None = None,
) -> dict[str, list[dict]]:
    """Run every configuration ``repeats`` times, each in a fresh process, taking turns.

    Each repeat uses a new random order (seeded), so slow drift of the machine's load does
    not favour whoever always runs first. Past ``budget_s`` seconds no new repeat starts
    (the medians then rest on fewer repeats; ``n`` says how many). Returns config → list
    of worker results.
    """
    rng = random.Random(seed)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    start = time.perf_counter()
    for rep in range(repeats):
        if budget_s is not None and rep and time.perf_counter() - start > budget_s:
            log(f"time budget of {budget_s:.0f} s spent: stopping after {rep} repeats")
            break
        order = list(configs)
        rng.shuffle(order)
        for config in order:
            t0 = time.perf_counter()
            res = run_worker(script, config, worker_args, timeout)
            results[config].append(res)
            status = res.get("error") or _short(res)
            log(
                f"[repeat {rep + 1}/{repeats}] {config:<22} {time.perf_counter() - t0:5.0f} s  {status}"
            )
    return results


def _short(res: dict) -> str:
    keys = [k for k in ("step_s", "prefill_s", "decode_s_per_token", "peak_rss_gb") if k in res]
    return "  ".join(f"{k}={res[k]:.4g}" for k in keys if isinstance(res[k], int | float))


def medians(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Median of every numeric field over the repeats that succeeded (plus ``n`` and errors)."""
    out: dict[str, dict] = {}
    for config, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        med: dict = {"n": len(ok)}
        if not ok:
            med["error"] = runs[-1].get("error", "no result") if runs else "not run"
        for key in ok[0] if ok else []:
            values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
            if values and not isinstance(ok[0][key], bool):
                med[key] = statistics.median(values)
            elif key not in med:
                med[key] = ok[0][key]
        out[config] = med
    return out


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a "
    return "PASS" if value <= limit else "MISS"


def ratio(a: dict, b: dict, key: str) -> float | None:
    """``a[key] / b[key]`` when both measured, else None."""
    x, y = a.get(key), b.get(key)
    if not isinstance(x, int | float) or not isinstance(y, int | float) or y == 0:
        return None
    return x / y


def paired_ratio(raw: dict[str, list[dict]] | None, a: str, b: str, key: str) -> float | None:
    """Median over repeats of ``a[key] / b[key]`` taken within the same repeat.

    Configurations of one repeat run minutes apart at most, so a slow phase of the machine
    hits both sides of each pair; the ratio of two medians can pair a fast ``a`` with a slow
    ``b``. None without raw results or without a repeat where both succeeded.
    """
    if not raw or a not in raw or b not in raw:
        return None
    pairs = [
        x[key] / y[key]
        for x, y in zip(raw[a], raw[b])
        if isinstance(x.get(key), int | float) and isinstance(y.get(key), int | float) and y[key]
    ]
    return statistics.median(pairs) if pairs else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def run_driver(
    name: str,
    args,
    known: Sequence[str],
    worker_args: Sequence[str],
    report: Callable[[dict], list],
) -> int:
    """Driver mode of a benchmark script: check ``--configs``, run every configuration in its
    own worker process (``args.repeats`` turns), print ``report(medians)``, dump JSON."""
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in known]
    if unknown:
        print(f"unknown configs {unknown}; choose from {', '.join(known)}")
        return 2
    print(
        f"{name}: {' '.join(sys.argv[1:]) or '(defaults)'}; {len(configs)} configs × "
        f"{args.repeats} repeats, each in its own process",
        flush=True,
    )
    raw = drive(
        name,
        configs,
        args.repeats,
        worker_args,
        log=lambda s: print(s, flush=True),
        budget_s=args.budget_s,
    )
    med = medians(raw)
    rows = report(med, raw=raw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "raw": raw, "medians": med, "targets": rows},
                f,
                indent=1,
                default=str,  # Path arguments (--data)
            )
    return 0


def arg_parser(
    doc: str, configs: Sequence[str], batch: int, dtypes: Sequence[str]
) -> argparse.ArgumentParser:
    """The options every benchmark script shares; each script adds its own on top."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--config", help="run one configuration in this process (worker mode)")
    p.add_argument("--configs", default=",".join(configs), help="comma-separated, driver mode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m", help='"smollm2-135m" or "tiny" (tests)')
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(dtypes))
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="driver: also write all raw results and medians here")
    p.add_argument("--budget-s", type=float, help="driver: start no new repeat after this long")
    return p
