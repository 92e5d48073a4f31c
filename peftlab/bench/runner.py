"""``peftlab compare``: train every method on the same model, data, token budget, seeds and
evaluation, each in its own process, and write one JSON per run plus a report.

:func:`plan` turns a :class:`~peftlab.bench.spec.CompareConfig` into one
:class:`~peftlab.bench.spec.RunSpec` per method and seed, each method at its own learning rate
(its registered prior ``MethodSpec.tuning.lr`` unless ``lr``/``lr_full`` is given); with
``tune``, :mod:`peftlab.bench.search` first searches each method's own grid on the validation
split and its measured runs take the chosen setting. :func:`run_one` starts a worker for a
spec and gets back its :class:`~peftlab.results.RunResult`.

The output directory is the comparison's state (:mod:`peftlab.bench.outdir`: compare writes
only what it owns there): ``plan.json`` (the settings and the files compare wrote), one
``<method>.json`` per run (``<method>-seed<k>.json`` with several seeds), written atomically
by the worker, and ``compare-runs/`` (training directories, worker logs, searches). Running
the same command again skips every run whose JSON exists (and every finished search), so a
killed comparison resumes with what is missing; a run that failed keeps its recorded error
unless ``retry_failed``.

Before each run the machine's load is read (:func:`peftlab.bench.load.snapshot`) and, unless
``threads`` is given, the worker's thread count chosen from it
(:func:`~peftlab.bench.load.choose_threads`); the readings before, during and after the run go
into its ``meta_info.load`` and decide whether its timings are reliable
(:mod:`peftlab.bench.timing`).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from peftlab.bench import search as searching
from peftlab.bench.outdir import REPORT_FILES, OutDir, check_resumable
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

FALLBACK_LR = {False: 1e-3, True: 5e-5}
"""Learning rate of a method that declares no prior (``MethodSpec.tuning`` None), by whether
it trains the base weights."""
LOAD_WINDOW = 0.5
"""Seconds each load reading watches the machine."""


def run_name(method: str, seed: int, seeds: list[int]) -> str:
    return method if len(seeds) == 1 else f"{method}-seed{seed}"


def method_lr(config: CompareConfig, method: str) -> float:
    """The learning rate ``method`` runs at untuned: ``lr_full`` for a method that trains the
    base weights, else ``lr``, else the method's own prior — never one shared default."""
    from peftlab.core.registry import get_method

    spec = get_method(method)
    trains_base = not spec.param_prefix
    if trains_base and config.lr_full is not None:
        return config.lr_full
    if config.lr is not None:
        return config.lr
    return spec.tuning.lr if spec.tuning is not None else FALLBACK_LR[trains_base]


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
    runs = out / "compare-runs"
    seed_list = [config.seed + k for k in range(config.seeds)]
    specs = []
    for m in methods:
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
                lr=method_lr(config, m),
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
                run_dir=str(runs / name),
                result_path=str(out / f"{name}.json"),
            )
            specs.append(spec.fingerprinted())
    # Bad keys or option values fail here, before any run starts, not once per method.
    from peftlab.train.config import TrainConfig

    for spec in specs:
        TrainConfig.from_dict(spec.train_config()).method_config()
    return specs


def plan_searches(config: CompareConfig, specs: list[RunSpec]) -> dict:
    """Each tuned method's :class:`~peftlab.bench.search.SearchSpec` (empty without ``tune``)."""
    fixed = {m: set(args) for m, args in config.method_args.items()}
    for s in specs:
        if config.lr is not None or (config.lr_full is not None and _trains_base(s.method)):
            fixed.setdefault(s.method, set()).add("lr")
    runs = Path(config.out).resolve() / "compare-runs" / "search"
    return searching.plan_searches(config.tune, specs, fixed, runs)


def _trains_base(method: str) -> bool:
    from peftlab.core.registry import get_method

    return not get_method(method).param_prefix


def _spawn(args: list[str], log_path: Path, timeout: float | None) -> int | str:
    """Run a worker command with its output in ``log_path``; its exit code or "timeout"."""
    with open(log_path, "w") as log:
        try:
            return subprocess.run(
                [sys.executable, "-m", "peftlab.bench.worker", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


def _exit_note(rc: int | str, timeout: float | None, log_path: Path) -> str:
    why = f"worker exited with {rc} after {timeout} s" if rc == "timeout" else None
    return f"{why or f'worker exited with code {rc}'} and wrote no result (see {log_path})"


def run_one(spec: RunSpec, timeout: float | None = None) -> RunResult:
    """Run one worker process for ``spec``; a crash with no JSON is recorded as a failure."""
    from peftlab.bench.worker import failure, write_json_atomic

    run_dir = Path(spec.run_dir)
    if run_dir.exists():  # leftovers of a run killed before it wrote its result
        import shutil

        if not (run_dir.parent / ".peftlab-compare").is_file():
            raise ConfigError(f"{run_dir} is not inside compare's own compare-runs/; not removed")
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir.parent / f"{spec.name}.spec.json"
    spec_path.write_text(json.dumps(spec.to_json(), indent=2))
    log_path = run_dir.parent / f"{spec.name}.log"
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rc = _spawn([str(spec_path)], log_path, timeout)
    result = RunResult.load(spec.result_path)
    if result is None:
        tail = log_path.read_text()[-4000:] if log_path.exists() else ""
        result = failure(spec, _exit_note(rc, timeout, log_path), tail, start)
        write_json_atomic(spec.result_path, result.to_json())
    return result


def _threads(config: CompareConfig) -> tuple[dict, int, str]:
    """A load reading now, the threads a worker should use, and why."""
    from peftlab.bench.load import choose_threads, snapshot

    load = snapshot(LOAD_WINDOW)
    if config.threads is None and config.jobs > 1:  # the other jobs' workers are not "other work"
        return load.to_dict(), max(1, load.cores // config.jobs), f"cores / --jobs {config.jobs}"
    threads = choose_threads(load, config.threads)
    return load.to_dict(), threads, "--threads" if config.threads else "choose_threads(load)"


def compare(
    methods: list[str] | CompareConfig | None = None,
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    steps: int | None = None,
    seeds: int | None = None,
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
        seeds: runs per method with seeds ``seed``, ``seed+1``, … (default 3; 1 with ``quick``).
        out: output directory; rerunning with the same ``out`` resumes.
        quick: the small budget (`--quick`, a few minutes on a 2-core CPU): batch 4 instead of
            8, 8 held-out examples instead of 32, one seed.
        retry_failed: rerun runs (and searches) whose recorded result is a failure.
        timeout: seconds after which one run is stopped and recorded as failed (a search gets
            one per rung and one more).
        report: write ``report.md`` / ``report.html`` and print the summary table.
        echo: print progress lines.
        report_only: run nothing; rewrite the report from the results already in ``out``
            (a comparison still in progress, or one stopped part-way).
        **settings: further :class:`~peftlab.bench.spec.CompareConfig` fields (``batch_size``,
            ``max_length``, ``lr``, ``lr_full``, ``tune``, ``method_args``, ``seed``,
            ``device``, ``train_overrides``, ``threads``).
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
    searches = plan_searches(config, specs)
    outdir = OutDir(config.out).open()
    written = [s.result_path for s in specs]
    written += [outdir.root / f for f in REPORT_FILES] if report else []
    outdir.check(written)  # nothing of the user's is overwritten, checked before any run
    outdir.check_covers([s.name for s in specs], report)  # nor another comparison's report
    check_resumable([s for s in specs if s.method not in searches])
    searching.check_recorded(searches, specs)
    outdir.prepare()
    outdir.claim(written)
    runs = {s.name: s for s in specs}
    outdir.set_runs(_plan_runs(runs.values(), config))
    ctx = _Context(config, outdir, retry_failed, timeout, echo, report_only, len(specs))
    results = _run_methods(specs, searches, runs, ctx)
    if report_only and not results:
        raise ConfigError(
            f"{outdir.root} holds no results of this comparison yet; run it without --report-only"
        )
    paths = {}
    if report and results:
        from peftlab.bench.report import write_report

        paths = write_report(outdir.root, results, echo=echo)
    return {"results": [r.to_json() for r in results], "out": str(outdir.root), **paths}


@dataclasses.dataclass
class _Context:
    """What every run of one :func:`compare` call shares."""

    config: CompareConfig
    outdir: OutDir
    retry_failed: bool
    timeout: float | None
    echo: bool
    report_only: bool
    total: int
    done: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """Held to count runs, print and write plan.json (methods may run side by side)."""

    def say(self, *args, **kwargs) -> None:
        if self.echo:
            with self.lock:
                print(*args, **kwargs)

    def tick(self) -> int:
        """Count one run; its number."""
        with self.lock:
            self.done += 1
            return self.done


def _run_methods(specs: list[RunSpec], searches: dict, runs: dict, ctx: _Context) -> list:
    """Each method: its search (with ``tune``), then its runs; the results, in method order.
    With ``jobs`` > 1 that many methods go side by side."""
    methods = list(dict.fromkeys(s.method for s in specs))

    def one(method: str) -> list:
        mine = [s for s in specs if s.method == method]
        mine, tuning = _tuned(method, mine, searches.get(method), ctx)
        if tuning is not None and tuning.get("chosen") is None and method in searches:
            return _failed_search(mine, tuning, ctx)
        with ctx.lock:
            runs.update({s.name: s for s in mine})  # plan.json records the tuned settings
            ctx.outdir.set_runs(_plan_runs(runs.values(), ctx.config))
        done = [_run_or_reuse(spec, tuning, ctx) for spec in mine]
        return [r for r in done if r is not None]

    from peftlab.bench.parallel import map_in_order

    return map_in_order(one, methods, 1 if ctx.report_only else ctx.config.jobs)


def _plan_runs(specs, config: CompareConfig) -> list[dict]:
    runs = [{k: v for k, v in s.to_json().items() if k != "threads"} for s in specs]
    return runs if not config.tune else [{**r, "tune": list(config.tune)} for r in runs]


def _tuned(method: str, specs: list[RunSpec], search, ctx: _Context):
    """``method``'s specs at its tuned setting and their ``train_info.tuning`` (searching
    first when needed); a failed search returns the untuned specs and its record."""
    if search is None:
        return specs, searching.untuned_note(ctx.config.tune, method)
    found = _search_or_reuse(search, ctx)
    if found is None:  # report_only and never searched
        return [], None
    tuning = searching.tuning_record(search, found)
    chosen = tuning["chosen"]
    if chosen is None:
        return specs, tuning
    tuned = [searching.apply_candidate(s, chosen).fingerprinted() for s in specs]
    if not ctx.report_only:
        check_resumable(tuned)
    return tuned, tuning


def _search_or_reuse(search, ctx: _Context) -> dict | None:
    """The recorded search of ``search`` if it is this one (and succeeded, or failures are
    kept); else run it in a search worker."""
    from peftlab.bench.worker import write_json_atomic

    path = Path(search.result_path)
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or found.get("fingerprint") != search.fingerprint:
        found = None
    head = f"{search.method}: search"
    if ctx.report_only or (found and (found["search"]["best"] is not None or not ctx.retry_failed)):
        if found is not None:
            ctx.say(f"{head} already done, chose {found['search']['best']}")
        return found
    rungs = search.rungs()
    ctx.say(
        f"{head} over {', '.join(search.keys)}: {len(search.candidates)} candidates, rungs of "
        f"{rungs or [search.budget]} steps on the validation split …",
        flush=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _, threads, _ = _threads(ctx.config)
    spec = dataclasses.replace(search, base=dataclasses.replace(search.base, threads=threads))
    spec_path = path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec.to_json(), indent=2))
    t0 = time.perf_counter()
    timeout = ctx.timeout * (len(rungs) + 1) if ctx.timeout else None
    rc = _spawn(["--search", str(spec_path)], path.with_suffix(".log"), timeout)
    try:
        found = json.loads(path.read_text())
        assert found.get("fingerprint") == search.fingerprint
    except (OSError, ValueError, AssertionError):
        error = _exit_note(rc, timeout, path.with_suffix(".log"))
        found = {"fingerprint": search.fingerprint, "search": {"best": None, "error": error,
                                                               "trials": []}}  # fmt: skip
        write_json_atomic(path, found)
    best = found["search"]["best"]
    what = f"chose {best}" if best is not None else f"FAILED: {found['search']['error']}"
    ctx.say(f"{head} {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return found


def _failed_search(specs: list[RunSpec], tuning: dict, ctx: _Context) -> list[RunResult]:
    """Every run of a method whose search failed, recorded as failed with its first error."""
    from peftlab.bench.worker import failure, write_json_atomic

    out = []
    for spec in specs:
        n = ctx.tick()
        if ctx.report_only:
            done = RunResult.load(spec.result_path)
            out += [done] if done is not None else []
            continue
        result = failure(spec, f"tuning failed: {tuning['error']}", "")
        result.train_info.tuning = tuning
        write_json_atomic(spec.result_path, result.to_json())
        ctx.say(f"[{n}/{ctx.total}] {spec.name}: FAILED: tuning failed", flush=True)
        out.append(result)
    return out


def _run_or_reuse(spec: RunSpec, tuning: dict | None, ctx: _Context) -> RunResult | None:
    """The result of ``spec``: the recorded one if there is one to keep, else a new run
    (none with ``report_only``)."""
    from peftlab.bench.worker import write_json_atomic

    head = f"[{ctx.tick()}/{ctx.total}] {spec.name}:"
    done = RunResult.load(spec.result_path)
    if ctx.report_only:
        if done is None:
            ctx.say(f"{head} not run yet, left out of the report")
        return done
    if done is not None and (done.ok or not ctx.retry_failed):
        ctx.say(f"{head} already done ({done.train_info.status}), skipped")
        return done
    before, threads, why = _threads(ctx.config)
    ctx.say(f"{head} training {spec.steps} steps at lr {spec.lr:g}, {threads} thread(s) …",
            flush=True)  # fmt: skip
    t0 = time.perf_counter()
    result = RunResult.coerce(run_one(dataclasses.replace(spec, threads=threads), ctx.timeout))
    after, _, _ = _threads(ctx.config)
    _annotate(result, tuning, (before, after), threads, why, ctx.config.jobs)
    write_json_atomic(spec.result_path, result.to_json())
    ti = result.train_info
    if not result.ok:
        what = f"FAILED: {ti.error}"
    elif ti.final_loss is not None:
        what = f"ok, final loss {ti.final_loss:.3f}"
    else:
        what = "ok"
    ctx.say(f"{head} {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def _annotate(result: RunResult, tuning, around: tuple, threads: int, why: str, jobs: int):
    """Add what the runner knows to a worker's result: the search, and the load readings
    ``around`` the run (before, after), which may make its timings unreliable; a run beside
    other runs (``jobs`` > 1) has unreliable timings whatever the readings say."""
    from peftlab.bench.timing import UNRELIABLE, reliability

    worker = dict(result.meta_info.load or {})
    load = {"before_run": around[0], **worker, "after_run": around[1], "threads": threads}
    result.meta_info.load = {**load, "threads_from": why, "jobs": jobs}
    result.train_info.tuning = tuning
    if result.ok:
        judged = reliability(load)
        if jobs > 1:
            judged = {
                "reliable": False,
                "why": f"{UNRELIABLE}: ran beside other runs (--jobs {jobs})",
            }
        result.train_info.timing = {**(result.train_info.timing or {}), **judged}
