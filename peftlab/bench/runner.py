"""``peftlab compare``: train every method on the same model, data, token budget, seed and
evaluation, each in its own process, and write one JSON per run plus a report.

:func:`plan` turns a :class:`~peftlab.bench.spec.CompareConfig` into one
:class:`~peftlab.bench.spec.RunSpec` per method and seed; :func:`run_one` starts a worker for
a spec and gets back its :class:`~peftlab.results.RunResult`.

The output directory is the comparison's state: ``plan.json`` (the settings), one
``<method>.json`` per run (``<method>-seed<k>.json`` with several seeds), written atomically by
the worker, and ``runs/<run>/`` (training directory and worker log). Running the same command
again skips every run whose JSON exists, so a killed comparison resumes with what is missing;
a run that failed keeps its recorded error unless ``retry_failed``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from peftlab.bench.spec import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    FULL,
    QUICK,
    Budget,
    CompareConfig,
    InferenceSettings,
    RunSpec,
)
from peftlab.core.config import ConfigError
from peftlab.results import RunResult

__all__ = ["Budget", "CompareConfig", "DEFAULT_MODEL", "FULL", "QUICK", "compare", "plan"]


def run_name(method: str, seed: int, seeds: list[int]) -> str:
    return method if len(seeds) == 1 else f"{method}-seed{seed}"


def plan(config: CompareConfig) -> list[RunSpec]:
    """The worker specs of a comparison, one per method and seed (see :func:`compare`)."""
    import torch

    from peftlab.core.registry import get_method
    from peftlab.core.registry import methods as registered
    from peftlab.models import model_kind

    kind = model_kind(config.model)
    if config.data is None and kind not in DEFAULT_DATA:
        raise ConfigError(
            f"model {config.model!r} is a {kind} model and peftlab has no built-in {kind} task; "
            f"pass data (--data), e.g. a .tsv with text and label columns such as "
            f"../shared/data/sst2/train.tsv"
        )
    # Every method applies to both model kinds, so the default is every registered one.
    methods = list(config.methods) if config.methods else registered()
    for m in methods:
        get_method(m)  # unknown name → error listing the registered ones
    unknown = sorted(set(config.method_args) - set(registered()))
    if unknown:
        raise ConfigError(
            f"method_args names unknown method(s) {unknown}; registered: {registered()}"
        )
    budget = config.budget()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(config.out).resolve()
    seed_list = [config.seed + k for k in range(config.seeds)]
    specs = []
    for m in methods:
        trains_base = not get_method(m).param_prefix
        for s in seed_list:
            name = run_name(m, s, seed_list)
            spec = RunSpec(
                name=name,
                method=m,
                method_args=dict(config.method_args.get(m, {})),
                model=config.model,
                kind=kind,
                data=config.data or DEFAULT_DATA[kind],
                seed=s,
                steps=budget.steps,
                batch_size=budget.batch_size,
                max_length=budget.max_length,
                # Full fine-tuning moves every weight, so it needs a far smaller step size.
                lr=config.lr_full if trains_base else config.lr,
                device=device,
                threads=config.threads,
                inference=InferenceSettings(
                    new_tokens=budget.new_tokens,
                    repeats=budget.repeats,
                    max_prompt_length=budget.max_length,
                ),
                # One evaluation, after the last step, on the same held-out examples for every
                # method; no checkpoints: a run is the unit a resumed comparison redoes.
                train_overrides={
                    "eval_size": budget.eval_size,
                    "eval_every": 0,
                    "eval_before": False,
                    "save_every": 0,
                    "progress": False,
                    **config.train_overrides,
                },
                run_dir=str(out / "runs" / name),
                result_path=str(out / f"{name}.json"),
            )
            specs.append(spec.fingerprinted())
    # Bad keys or option values fail here, before any run starts, not once per method.
    from peftlab.train.config import TrainConfig

    for spec in specs:
        TrainConfig.from_dict(spec.train_config()).method_config()
    return specs


def run_one(spec: RunSpec, timeout: float | None = None) -> RunResult:
    """Run one worker process for ``spec``; a crash with no JSON is recorded as a failure."""
    from peftlab.bench.worker import failure, write_json_atomic

    run_dir = Path(spec.run_dir)
    if run_dir.exists():  # leftovers of a run killed before it wrote its result
        import shutil

        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir.parent / f"{spec.name}.spec.json"
    spec_path.write_text(json.dumps(spec.to_json(), indent=2))
    log_path = run_dir.parent / f"{spec.name}.log"
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
    result = RunResult.load(spec.result_path)
    if result is None:
        tail = log_path.read_text()[-4000:] if log_path.exists() else ""
        why = (
            f"worker exited with {rc} after {timeout} s"
            if rc == "timeout"
            else f"worker exited with code {rc}"
        )
        result = failure(spec, f"{why} and wrote no result (see {log_path})", tail, start)
        write_json_atomic(spec.result_path, result.to_json())
    return result


def compare(
    methods: list[str] | CompareConfig | None = None,
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
    """Compare PEFT methods on one model and dataset; returns ``{"results": [...], "out": dir}``
    (each result the JSON object of its ``<run>.json``; see :class:`~peftlab.results.RunResult`).

    Args:
        methods: registry names; default every registered method. Or a whole
            :class:`~peftlab.bench.spec.CompareConfig`, which then replaces ``model`` …
            ``quick`` and ``settings``.
        model: bundled name, HF directory or GGUF path.
        data: ``builtin:<task>`` or a data file; default a built-in task for the model's kind.
        steps: optimizer steps per run (default 25, :data:`~peftlab.bench.spec.FULL`; 6 with
            ``quick``, :data:`~peftlab.bench.spec.QUICK`).
        seeds: runs per method with seeds ``seed``, ``seed+1``, …
        out: output directory; rerunning with the same ``out`` resumes.
        quick: the small budget (`--quick`, a few minutes on a 2-core CPU): batch 4 instead of
            8, 8 held-out examples instead of 32.
        retry_failed: rerun runs whose recorded result is a failure.
        timeout: seconds after which one run is stopped and recorded as failed.
        report: write ``report.md`` / ``report.html`` and print the summary table.
        echo: print progress lines.
        report_only: run nothing; rewrite the report from the results already in ``out``
            (a comparison still in progress, or one stopped part-way).
        **settings: further :class:`~peftlab.bench.spec.CompareConfig` fields (``batch_size``,
            ``max_length``, ``lr``, ``lr_full``, ``method_args``, ``seed``, ``device``,
            ``train_overrides``, ``threads``).
    """
    if isinstance(methods, CompareConfig):
        config = methods
    else:
        config = CompareConfig(
            methods=methods,
            model=model,
            data=data,
            steps=steps,
            seeds=seeds,
            out=out,
            quick=quick,
            **settings,
        )
    specs = plan(config)
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, specs)
    results = []
    for i, spec in enumerate(specs, 1):
        result = _run_or_reuse(
            spec, f"[{i}/{len(specs)}]", retry_failed, timeout, echo, report_only
        )
        if result is not None:
            results.append(result)
    if report_only and not results:
        raise ConfigError(
            f"{out} holds no results of this comparison yet; run it without --report-only"
        )
    paths = {}
    if report and results:
        from peftlab.bench.report import write_report

        paths = write_report(out, results, echo=echo)
    return {"results": [r.to_json() for r in results], "out": str(out), **paths}


def _run_or_reuse(
    spec: RunSpec,
    counter: str,
    retry_failed: bool,
    timeout: float | None,
    echo: bool,
    report_only: bool,
) -> RunResult | None:
    """The result of ``spec``: the recorded one if there is one to keep, else a new run
    (none with ``report_only``)."""
    say = print if echo else (lambda *a, **k: None)
    head = f"{counter} {spec.name}:"
    done = RunResult.load(spec.result_path)
    if report_only:
        if done is None:
            say(f"{head} not run yet, left out of the report")
        return done
    if done is not None and (done.ok or not retry_failed):
        say(f"{head} already done ({done.train_info.status}), skipped")
        return done
    say(f"{head} training {spec.steps} steps …", flush=True)
    t0 = time.perf_counter()
    result = RunResult.coerce(run_one(spec, timeout))
    ti = result.train_info
    if not result.ok:
        what = f"FAILED: {ti.error}"
    elif ti.final_loss is not None:
        what = f"ok, final loss {ti.final_loss:.3f}"
    else:
        what = "ok"
    say(f"{head} {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def _check_resumable(out: Path, specs: list[RunSpec]) -> None:
    """Refuse to mix results of different settings in one directory."""
    for spec in specs:
        done = RunResult.load(spec.result_path)
        if done is not None and done.run_info.fingerprint != spec.fingerprint:
            raise ConfigError(
                f"{spec.result_path} holds a run made with different settings than this comparison "
                f"(model, data, steps, batch, lr or method options differ); pass another --out, or "
                f"delete that file to rerun it"
            )
    from peftlab.bench.worker import write_json_atomic

    runs = [{k: v for k, v in s.to_json().items() if k != "threads"} for s in specs]
    write_json_atomic(out / "plan.json", {"runs": runs})
