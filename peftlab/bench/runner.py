"""``peftlab compare``: train every method on the same model, data, token budget, seed and
evaluation, each in its own process, and write one JSON per run plus a report.

The output directory is the comparison's state: ``plan.json`` (the settings), one
``<method>.json`` per run (``<method>-seed<k>.json`` with several seeds), written atomically by
the worker, and ``runs/<run>/`` (training directory and worker log). Running the same command
again skips every run whose JSON exists, so a killed comparison resumes with what is missing;
a run that failed keeps its recorded error unless ``retry_failed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from peftlab.bench.worker import RUN_INFO_KEYS
from peftlab.core.config import ConfigError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = {"causal-lm": "builtin:sort"}
"""Default data per model kind; classification has no built-in task, so it needs ``data``."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget shared by every method; the defaults are sized for a 2-core CPU."""

    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    new_tokens: int = 16
    repeats: int = 3


FULL = Budget(steps=25, batch_size=8, max_length=64, eval_size=32, new_tokens=12, repeats=3)
"""`peftlab compare`: ≤ 20 min for every method on the bundled SmolLM2 on a 2-core CPU."""
QUICK = Budget(steps=6, batch_size=4, max_length=64, eval_size=8, new_tokens=8, repeats=2)
"""`peftlab compare --quick`: ≤ 5 min."""


def default_methods(kind: str) -> list[str]:
    """Every registered method that applies to models of ``kind``.

    A config class may declare ``kinds`` (a ClassVar tuple of "causal-lm" /
    "classification"); one that does not is taken to apply to both.
    """
    from peftlab.core.registry import get_method, methods

    return [m for m in methods() if kind in getattr(get_method(m).config_cls, "kinds", (kind,))]


def run_name(method: str, seed: int, seeds: list[int]) -> str:
    return method if len(seeds) == 1 else f"{method}-seed{seed}"


def fingerprint(spec: dict) -> str:
    """Hash of everything that decides a run's numbers (not paths), to refuse mixing settings."""
    # The run_info fields (the hash itself aside) and what else sets the numbers.
    keys = (
        *(k for k in RUN_INFO_KEYS if k != "fingerprint"),
        "inference",
        "train_overrides",
        "device",
    )
    blob = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(
    methods: list[str] | None = None,
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    steps: int | None = None,
    seeds: int = 1,
    out: str | Path = "compare-out",
    quick: bool = False,
    batch_size: int | None = None,
    max_length: int | None = None,
    lr: float = 1e-3,
    lr_full: float = 5e-5,
    method_args: dict[str, dict] | None = None,
    seed: int = 0,
    device: str | None = None,
    train_overrides: dict | None = None,
    threads: int | None = None,
) -> list[dict]:
    """The worker specs of a comparison, one per method and seed (see :func:`compare`)."""
    import torch

    from peftlab.core.registry import get_method
    from peftlab.core.registry import methods as registered
    from peftlab.models import model_kind

    if seeds < 1:
        raise ConfigError(f"seeds={seeds!r} is invalid: seeds must be at least 1")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps={steps!r} is invalid: steps must be at least 1")
    kind = model_kind(model)
    if data is None and kind not in DEFAULT_DATA:
        raise ConfigError(
            f"model {model!r} is a {kind} model and peftlab has no built-in {kind} task; pass "
            f"data (--data), e.g. a .tsv with text and label columns such as ../shared/data/sst2/train.tsv"
        )
    methods = list(methods) if methods else default_methods(kind)
    for m in methods:
        get_method(m)  # unknown name → error listing the registered ones
    unknown = sorted(set(method_args or {}) - set(registered()))
    if unknown:
        raise ConfigError(
            f"method_args names unknown method(s) {unknown}; registered: {registered()}"
        )
    budget = QUICK if quick else FULL
    budget = dataclasses.replace(
        budget,
        steps=steps or budget.steps,
        batch_size=batch_size or budget.batch_size,
        max_length=max_length or budget.max_length,
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out).resolve()
    seed_list = [seed + k for k in range(seeds)]
    specs = []
    for m in methods:
        trains_base = not get_method(m).param_prefix
        for s in seed_list:
            name = run_name(m, s, seed_list)
            spec = {
                "name": name,
                "method": m,
                "method_args": dict((method_args or {}).get(m, {})),
                "model": model,
                "kind": kind,
                "data": data or DEFAULT_DATA[kind],
                "seed": s,
                "steps": budget.steps,
                "batch_size": budget.batch_size,
                "max_length": budget.max_length,
                # Full fine-tuning moves every weight, so it needs a far smaller step size.
                "lr": lr_full if trains_base else lr,
                "device": device,
                "threads": threads,
                "inference": {
                    "new_tokens": budget.new_tokens,
                    "repeats": budget.repeats,
                    "max_prompt_length": budget.max_length,
                },
                # One evaluation, after the last step, on the same held-out examples for every
                # method; no checkpoints: a run is the unit a resumed comparison redoes.
                "train_overrides": {
                    "eval_size": budget.eval_size,
                    "eval_every": 0,
                    "eval_before": False,
                    "save_every": 0,
                    "progress": False,
                    **(train_overrides or {}),
                },
                "run_dir": str(out / "runs" / name),
                "result_path": str(out / f"{name}.json"),
            }
            spec["fingerprint"] = fingerprint(spec)
            specs.append(spec)
    # Bad keys or option values fail here, before any run starts, not once per method.
    from peftlab.bench.worker import train_config
    from peftlab.train.config import TrainConfig

    for spec in specs:
        TrainConfig.from_dict(train_config(spec)).method_config()
    return specs


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_one(spec: dict, timeout: float | None = None) -> dict:
    """Run one worker process for ``spec``; a crash with no JSON is recorded as a failure."""
    from peftlab.bench.worker import failure, write_json_atomic

    run_dir = Path(spec["run_dir"])
    if run_dir.exists():  # leftovers of a run killed before it wrote its result
        import shutil

        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir.parent / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = run_dir.parent / f"{spec['name']}.log"
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "peftlab.bench.worker", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = _load(Path(spec["result_path"]))
    if result is None:
        tail = log_path.read_text()[-4000:] if log_path.exists() else ""
        why = (
            f"worker exited with {rc} after {timeout} s"
            if rc == "timeout"
            else f"worker exited with code {rc}"
        )
        result = failure(spec, f"{why} and wrote no result (see {log_path})", tail, start)
        write_json_atomic(spec["result_path"], result)
    return result


def compare(
    methods: list[str] | None = None,
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    steps: int | None = None,
    seeds: int = 1,
    out: str | Path = "compare-out",
    quick: bool = False,
    retry_failed: bool = False,
    timeout: float | None = None,
    report: bool = True,
    echo: bool = True,
    report_only: bool = False,
    **settings,
) -> dict:
    """Compare PEFT methods on one model and dataset; returns ``{"results": [...], "out": dir}``.

    Args:
        methods: registry names; default every registered method that applies to the model.
        model: bundled name, HF directory or GGUF path.
        data: ``builtin:<task>`` or a data file; default a built-in task for the model's kind.
        steps: optimizer steps per run (default 40; 10 with ``quick``).
        seeds: runs per method with seeds ``seed``, ``seed+1``, …
        out: output directory; rerunning with the same ``out`` resumes.
        quick: the small budget (`--quick`, a few minutes on a 2-core CPU).
        retry_failed: rerun runs whose recorded result is a failure.
        timeout: seconds after which one run is stopped and recorded as failed.
        report: write ``report.md`` / ``report.html`` and print the summary table.
        echo: print progress lines.
        report_only: run nothing; rewrite the report from the results already in ``out``
            (a comparison still in progress, or one stopped part-way).
        **settings: further :func:`plan` keywords (``batch_size``, ``max_length``, ``lr``,
            ``lr_full``, ``method_args``, ``seed``, ``device``, ``train_overrides``, ``threads``).
    """
    specs = plan(methods, model, data, steps, seeds, out, quick, **settings)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, specs)
    results = []
    for i, spec in enumerate(specs, 1):
        path = Path(spec["result_path"])
        done = _load(path)
        if report_only:
            if done is not None:
                results.append(done)
            elif echo:
                print(f"[{i}/{len(specs)}] {spec['name']}: not run yet, left out of the report")
            continue
        if done is not None and (done["train_info"]["status"] == "ok" or not retry_failed):
            if echo:
                print(
                    f"[{i}/{len(specs)}] {spec['name']}: already done ({done['train_info']['status']}), skipped"
                )
            results.append(done)
            continue
        if echo:
            print(
                f"[{i}/{len(specs)}] {spec['name']}: training {spec['steps']} steps …", flush=True
            )
        t0 = time.perf_counter()
        result = run_one(spec, timeout)
        results.append(result)
        if echo:
            ti = result["train_info"]
            what = (
                f"ok, final loss {ti['final_loss']:.3f}"
                if ti["status"] == "ok" and ti.get("final_loss") is not None
                else ti["status"]
                if ti["status"] == "ok"
                else f"FAILED: {ti['error']}"
            )
            print(
                f"[{i}/{len(specs)}] {spec['name']}: {what} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    if report_only and not results:
        raise ConfigError(
            f"{out} holds no results of this comparison yet; run it without --report-only"
        )
    if report and results:
        from peftlab.bench.report import write_report

        paths = write_report(out, results, echo=echo)
    else:
        paths = {}
    return {"results": results, "out": str(out), **paths}


def _check_resumable(out: Path, specs: list[dict]) -> None:
    """Refuse to mix results of different settings in one directory."""
    plan_path = out / "plan.json"
    for spec in specs:
        done = _load(Path(spec["result_path"]))
        if done is not None and done["run_info"].get("fingerprint") != spec["fingerprint"]:
            raise ConfigError(
                f"{spec['result_path']} holds a run made with different settings than this comparison "
                f"(model, data, steps, batch, lr or method options differ); pass another --out, or "
                f"delete that file to rerun it"
            )
    from peftlab.bench.worker import write_json_atomic

    write_json_atomic(
        plan_path, {"runs": [{k: v for k, v in s.items() if k != "threads"} for s in specs]}
    )
