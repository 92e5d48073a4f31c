"""Fair comparisons (#15) and a safe output directory (#17 defect 8), without training: each
method's own learning rate, ``--tune`` planning and its errors, 95% intervals and verdicts,
baselines, timing that never turns noise or a busy machine into a finding, and a report with
no markup leaking into its HTML."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

from peftlab.bench import claims, runner, search, timing
from peftlab.bench.report import write_report
from peftlab.bench.spec import CompareConfig
from peftlab.bench.summary import compare_methods, summarize
from peftlab.cli import compare as compare_cli
from peftlab.core.config import ConfigError
from peftlab.results import Quality, quality
from tests.unit.test_compare import assert_self_contained, fake_result

MODEL = "smollm2-135m"  # a bundled name: planning reads its kind without loading it


def plan(*methods, **kw):
    return runner.plan(CompareConfig(list(methods), model=MODEL, **kw))


# ---------------------------------------------------------------- own learning rates, seeds


def test_each_method_runs_at_its_own_prior_unless_the_user_sets_one(tmp_path):
    lrs = {s.method: s.lr for s in plan("lora", "prompt", "full", out=tmp_path, quick=True)}
    assert lrs == {"lora": 1e-3, "prompt": 1e-2, "full": 5e-5}
    lrs = {s.method: s.lr for s in plan("lora", "full", out=tmp_path, quick=True, lr=2e-4)}
    assert lrs == {"lora": 2e-4, "full": 2e-4}  # --lr: one rate for every method
    lrs = {
        s.method: s.lr
        for s in plan("lora", "full", out=tmp_path, quick=True, lr=2e-4, lr_full=1e-5)
    }
    assert lrs == {"lora": 2e-4, "full": 1e-5}
    with pytest.raises(ConfigError, match="lr=0 is invalid"):
        plan("lora", out=tmp_path, lr=0)


def test_non_quick_comparisons_default_to_three_seeds(tmp_path):
    assert [s.seed for s in plan("lora", out=tmp_path)] == [0, 1, 2]
    assert [s.name for s in plan("lora", out=tmp_path, quick=True)] == ["lora"]
    assert len(plan("lora", out=tmp_path, seeds=2)) == 2


# ---------------------------------------------------------------- --tune planning


def searches(*methods, tune=("lr",), **kw):
    config = CompareConfig(list(methods), model=MODEL, tune=tune, quick=True, **kw)
    return runner.plan_searches(config, runner.plan(config))


def test_tune_plans_each_method_on_its_own_grid(tmp_path):
    found = searches("lora", "prompt", "full", out=tmp_path)
    assert [c["lr"] for c in found["lora"].candidates] == [1e-4, 3e-4, 1e-3, 2e-3]
    assert [c["lr"] for c in found["prompt"].candidates] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert [c["lr"] for c in found["full"].candidates] == [1e-5, 3e-5, 5e-5, 1e-4]
    # A key only some methods have: they search it, the others search what they have.
    found = searches("lora", "prompt", tune=("lr", "r"), out=tmp_path)
    assert found["lora"].keys == ["lr", "r"] and len(found["lora"].candidates) == 12
    assert found["prompt"].keys == ["lr"] and found["prompt"].skipped == ["r"]
    found = searches("lora", "full", tune=("r",), out=tmp_path)
    assert set(found) == {"lora"}  # full has no r: it runs at its prior, and says so
    assert "no grid for r" in search.untuned_note(("r",), "full")["note"]
    tuned = search.apply_candidate(found["lora"].base, {"r": 16, "lr": 3e-4})
    assert (tuned.lr, tuned.method_args["r"]) == (3e-4, 16)


def test_search_rungs_are_stretched_to_about_three_runs_never_beyond_one():
    from peftlab.bench.tune import rung_steps

    # Four learning rates on a 64-step run: halving alone gives 16 then 32 steps (2 runs of
    # cost), too few for a setting to show; stretched: 24 then 48 steps, 3 runs of cost.
    assert rung_steps(4, search.search_budget(4, 64, 2), 2) == [24, 48]
    assert search.search_cost(4, search.search_budget(4, 64, 2), 2) <= 3 * 64
    assert search.search_budget(12, 64, 2) == 64  # lr × r: already over 3 runs, not stretched
    assert rung_steps(2, search.search_budget(2, 10, 2), 2) == [10]  # never longer than a run


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tune=("alpha",)), "--tune alpha: no selected method has a grid for 'alpha'"),
        (dict(tune=("lr",), lr=1e-3), "'lr' is both searched and fixed by --lr"),
        (dict(tune=("r",), method_args={"lora": {"r": 4}}), "fixed by --set lora.r"),
        (dict(tune=("lr",), train_overrides={"eval_size": 0}), "eval_size must be > 0"),
    ],
)
def test_bad_tune_input_is_one_clear_error(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        searches("lora", "full", out=tmp_path, **kw)


def test_tune_errors_on_the_command_line_are_one_line(tmp_path, capsys):
    from peftlab.cli import main

    argv = ["compare", "--model", MODEL, "--methods", "lora", "--out", str(tmp_path)]
    assert main(argv + ["--tune", "alpha"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no selected method has a grid for 'alpha'" in err
    assert main(argv + ["--tune", "lr,"]) == 2
    assert "give comma-separated keys" in capsys.readouterr().err
    assert compare_cli._tune_keys("lr, r") == ("lr", "r")


# ---------------------------------------------------------------- the output directory


def fake_spawn(args, log_path, timeout):
    """A worker that writes an ok result for its spec, without training."""
    from peftlab.bench.spec import RunSpec

    spec = RunSpec.from_json(json.loads(Path(args[-1]).read_text()))
    Path(spec.run_dir).mkdir(parents=True)
    res = fake_result(spec.method, 5, 1000, 10, seed=spec.seed)
    res["run_info"].update(spec.run_info())
    Path(spec.result_path).write_text(json.dumps(res))
    return 0


@pytest.fixture
def no_workers(monkeypatch):
    monkeypatch.setattr(runner, "_spawn", fake_spawn)
    monkeypatch.setattr(runner, "LOAD_WINDOW", 0.01)


def run_compare(out, **kw):
    return runner.compare(["lora"], model=MODEL, out=out, quick=True, echo=False, **kw)


def test_compare_out_dot_never_deletes_a_training_run(tmp_path, no_workers, monkeypatch):
    # The README's own example output: `peftlab train` wrote runs/lora in this project.
    keep = tmp_path / "runs" / "lora" / "adapter" / "adapter_model.safetensors"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    run_compare(".", report=False)
    assert keep.read_bytes() == b"weights"
    assert (tmp_path / "compare-runs" / "lora").is_dir() and (tmp_path / "lora.json").exists()
    # A leftover of a killed run inside compare's own folder is compare's to redo.
    (tmp_path / "lora.json").unlink()
    (tmp_path / "compare-runs" / "lora" / "partial").write_text("x")
    run_compare(".", report=False)
    assert not (tmp_path / "compare-runs" / "lora" / "partial").exists()
    assert keep.read_bytes() == b"weights"


@pytest.mark.parametrize(
    "path, content, match",
    [
        ("lora.json", '{"my": "config"}', "lora.json exists and was not written by peftlab"),
        ("report.md", "# my notes", "report.md exists and was not written by peftlab"),
        ("plan.json", "[1, 2]", "plan.json exists and is not a peftlab compare plan"),
        ("compare-runs/x", "mine", "compare-runs exists and was not created by peftlab"),
    ],
)
def test_compare_refuses_to_overwrite_what_it_did_not_write(
    tmp_path, no_workers, path, content, match
):
    p = tmp_path / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        run_compare(tmp_path)
    assert p.read_text() == content
    assert not (tmp_path / "compare-runs" / ".peftlab-compare").exists()  # refused at once


def test_a_rerun_owns_what_the_first_run_wrote(tmp_path, no_workers):
    run_compare(tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {"lora.json", "report.md", "report.html", "summary.json"} <= set(plan["files"])
    run_compare(tmp_path, retry_failed=True)  # rewrites its own report without complaint
    # A directory of an earlier peftlab (plan.json without "files") is still compare's.
    del plan["files"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run_compare(tmp_path)


# ---------------------------------------------------------------- quality, intervals, verdicts


def classified(method, seed, acc, majority=0.5, base=0.5, test=True, lr=1e-3):
    r = fake_result(method, 5, 1000, 10, seed=seed)
    r["run_info"].update(kind="classification", lr=lr)
    ti = r["train_info"]
    ti["eval"] = {"eval_loss": 0.6, "eval_accuracy": acc - 0.01}
    if test:
        ti["test"] = {"test_loss": 0.6, "test_accuracy": acc}
    ti["baselines"] = {
        "split": "test" if test else "validation",
        "examples": 400,
        "majority": {"class": 1, "accuracy": majority},
        "base_model": {"loss": 0.7, "accuracy": base, "note": "head is new and random"},
    }
    return r


def test_quality_is_the_test_split_when_there_is_one():
    r = classified("lora", 0, 0.8)
    assert quality(r) == Quality("accuracy", 0.8, True, "test")
    assert quality(r, split="validation") == Quality("accuracy", 0.79, True, "validation")
    # Before test splits existed: the summary's "test" key is read too, else validation.
    r["train_info"]["train_summary"] = {"test": r["train_info"].pop("test")}
    assert quality(r).split == "test"
    assert quality(classified("lora", 0, 0.8, test=False)).split == "validation"
    assert quality(r, "test").score == 0.8 and Quality("loss", 2.0, False).score == -2.0


IDENTICAL = [0.812, 0.795, 0.830]  # one configuration's test accuracy over seeds 0, 1, 2


def test_identical_configurations_are_not_separated_and_lr_zero_is():
    results = []
    for seed, acc in enumerate(IDENTICAL):
        results.append(classified("lora", seed, acc))
        # The same configuration again: seed-level jitter of one or two test examples.
        results.append(classified("dora", seed, acc + (0.005 if seed % 2 else -0.0025)))
        # lr = 0: nothing trains but the new head's init; majority-level accuracy.
        results.append(classified("adapter", seed, 0.5 + 0.01 * seed, lr=0.0))
    summary = summarize(results)
    iv = summary["lora"]["intervals"]["quality"]
    assert iv["n"] == 3 and iv["ci95"] > 0
    comparison = compare_methods(summary)
    assert comparison["best"] in ("lora", "dora") and comparison["split"] == "test"
    by = {v.split(":")[0]: v for v in comparison["verdicts"]}
    other = "dora" if comparison["best"] == "lora" else "lora"
    assert "not separated" in by[f"{comparison['best']} vs {other}"]
    assert f"{comparison['best']} is better" in by[f"{comparison['best']} vs adapter"]
    assert "paired, n=3" in by[f"{comparison['best']} vs adapter"]
    majority = comparison["baselines"]["majority"]
    assert majority["methods"]["lora"]["beats"] and not majority["methods"]["adapter"]["beats"]
    assert not majority["all_beat"]


def test_one_seed_beats_the_majority_by_the_wilson_interval_over_examples():
    from peftlab.bench import baselines

    low, high = baselines.wilson(0.8, 400)
    assert low == pytest.approx(0.758, abs=1e-3) and high == pytest.approx(0.836, abs=1e-3)
    assert baselines.beats([0.8], 0.51, "accuracy", True, 400)["beats"]
    assert not baselines.beats([0.55], 0.51, "accuracy", True, 100)["beats"]  # [0.45, 0.65]
    assert baselines.beats([1.2], 1.0, "loss", False, 400)["beats"] is None  # no interval
    # Three seeds all at the majority class (MRPC study: 279/408 each): a tie, not a win,
    # although their mean rounds 1e-16 above it.
    tie = [279 / 408] * 3
    assert statistics.fmean(tie) > 279 / 408  # as stats.interval computes it
    assert baselines.beats(tie, 279 / 408, "accuracy", True, 408)["beats"] is False
    assert baselines.beats([0.7] * 3, 279 / 408, "accuracy", True, 408)["beats"] is True


# ---------------------------------------------------------------- timing honesty


def test_the_base_model_is_scored_once_per_setting(tmp_path):
    from peftlab.bench import baselines

    calls = []
    score = lambda: calls.append(1) or {"loss": 1.5}  # noqa: E731
    setting = {"model": "m", "data": {"seed": 0}}
    assert baselines.cached(tmp_path, setting, score) == {"loss": 1.5}
    assert baselines.cached(tmp_path, dict(setting), score) == {"loss": 1.5}
    assert len(calls) == 1  # the second run read the first one's score
    assert baselines.cached(tmp_path, {**setting, "data": {"seed": 1}}, score) and len(calls) == 2
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")  # a damaged file is scored again and replaced
    assert baselines.cached(tmp_path, setting, score) == {"loss": 1.5} and len(calls) == 3


def with_timing(r, noise, reliable=True, why=""):
    r["train_info"]["timing"] = {"reliable": reliable, "why": why, "noise_floor": noise}
    r["train_info"]["trains_base"] = r["run_info"]["method"] == "full"
    return r


def test_claims_build_no_verdict_on_noise_or_a_busy_machine():
    total = 1_000_000
    full = fake_result("full", total, total, 4000, overhead=-0.396)  # the published case
    full["train_info"]["inference"]["merged_vs_base"] = {"prefill_latency_ratio": 0.6}
    dora = fake_result("dora", 5_500, total, 1650, overhead=0.1)
    dora["train_info"]["inference"]["merged_vs_base"] = {"prefill_latency_ratio": 1.04}
    adapter = fake_result("adapter", 20_000, total, 1700, overhead=0.03, mergeable=False)
    lora = fake_result("lora", 5_000, total, 1600, overhead=0.3)
    rows = claims.check_claims(
        summarize(
            [
                with_timing(full, 0.05),
                with_timing(dora, 0.08),  # +4% inside ±8%: the claimed "low" is not reachable
                with_timing(adapter, 0.02),  # +3% beyond ±2%: a finding, at the very low level
                with_timing(lora, 0.02, reliable=False, why="unreliable (machine busy): x"),
            ]
        )
    )

    def cell(method):
        return next(
            r for r in rows if r["method"] == method and r["column"] == "inference overhead"
        )

    assert (
        cell("full")["verdict"] == "held" and "inside the noise floor" in cell("full")["measured"]
    )
    assert cell("dora")["verdict"] == "not separated from noise"
    assert cell("adapter")["verdict"] == "better than claimed"  # +3% > noise: very low, beyond
    assert cell("lora")["verdict"] == "not judged" and "machine busy" in cell("lora")["measured"]


def test_load_readings_decide_reliability():
    quiet = {"loaded": False, "other_busy_cores": 0.1}
    busy = {"loaded": True, "other_busy_cores": 1.5}
    assert timing.reliability({"a": quiet, "b": quiet})["reliable"]
    r = timing.reliability({"before_run": quiet, "after_train": busy})
    assert not r["reliable"] and r["why"].startswith(timing.UNRELIABLE)
    jump = timing.reliability({"a": quiet, "b": {"loaded": False, "other_busy_cores": 0.45}})
    assert jump["reliable"]  # 0.35 cores apart: the same regime
    assert not timing.legacy_reliability([11.4, 12.0, 12.0], 2)["reliable"]


# ---------------------------------------------------------------- the report


def test_a_best_mean_not_separated_from_the_rest_is_not_called_best(tmp_path):
    """The highest mean names no winner when its interval overlaps the others': the headline
    says so (it used to print "Best by …: **adapter**" above eight "not separated" lines)."""
    results = []
    for seed, acc in enumerate(IDENTICAL):
        results.append(with_timing(classified("lora", seed, acc), 0.03))
        results.append(with_timing(classified("prompt", seed, acc - 0.001 * (seed - 1)), 0.03))
    write_report(tmp_path, results, echo=False)
    md = (tmp_path / "report.md").read_text()
    assert "Best by" not in md
    assert re.search(r"Highest mean test accuracy \(higher is better\): (lora|prompt), .*; not "
                     r"separated from (prompt|lora), so there is no single best method\.", md)  # fmt: skip


def test_report_states_intervals_baselines_and_verdicts_without_markup(tmp_path):
    results = []
    for seed, acc in enumerate(IDENTICAL):
        results.append(with_timing(classified("lora", seed, acc), 0.03))
        results.append(with_timing(classified("prompt", seed, acc - 0.1), 0.03))
    results[0]["train_info"]["tuning"] = {
        "keys": ["lr"], "skipped": [], "chosen": {"lr": 0.002}, "error": None,
        "score": "validation accuracy", "note": "searched lr on the validation split",
        "search": {"best": {"lr": 0.002}, "error": None, "trials": [
            {"candidate": {"lr": 0.002}, "rung": 0, "steps": 4, "score": 0.8, "error": None,
             "kept": True},
            {"candidate": {"lr": 0.0001}, "rung": 0, "steps": 4, "score": None,
             "error": "TrainingDiverged: boom", "kept": False}]},
    }  # fmt: skip
    paths = write_report(tmp_path, results, echo=False)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "Best by test accuracy (higher is better): **lora**, 0.812 ± 0.043 (n=3)" in md
    assert "lora vs prompt: lora is better" in md
    assert "Every method beats the majority class (test accuracy 0.500" in md
    assert "test accuracy 0.812 ± 0.043 (n=3)" in md  # the table's quality cell
    assert re.search(r"\| lora \| .*MiB ± .* \(n=3\)", md)  # memory with its interval
    assert "chose lr=0.002" in md and "TrainingDiverged: boom" in md
    assert "``" not in page and ":func:" not in page and "**" not in page
    assert "<strong>lora</strong>" in page and "<code>" in page
    assert_self_contained(page, figures=4)
    assert paths["comparison"]["best"] == "lora"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["comparison"]["baselines"]["majority"]["all_beat"] is True


def test_a_method_whose_search_failed_is_reported_failed_and_the_others_go_on(
    tmp_path, monkeypatch
):
    def fake_search(search_spec, ctx):
        if search_spec.method == "lora":
            return {"fingerprint": search_spec.fingerprint, "search": {
                "best": None, "error": "every candidate failed; first: ValueError: nope",
                "trials": [{"candidate": {"lr": 1e-4}, "rung": 0, "steps": 2, "score": None,
                            "error": "ValueError: nope", "kept": False}]}}  # fmt: skip
        return {"fingerprint": search_spec.fingerprint, "score": "validation accuracy",
                "search": {"best": {"lr": 3e-3}, "error": None, "trials": []}}  # fmt: skip

    monkeypatch.setattr(runner, "_search_or_reuse", fake_search)
    monkeypatch.setattr(runner, "_spawn", fake_spawn)
    monkeypatch.setattr(runner, "LOAD_WINDOW", 0.01)
    res = runner.compare(["lora", "prompt"], model=MODEL, out=tmp_path, quick=True,
                         tune=("lr",), echo=False)  # fmt: skip
    lora, prompt = (r["train_info"] for r in res["results"])
    assert (
        lora["status"] == "failed" and "tuning failed" in lora["error"] and "nope" in lora["error"]
    )
    assert lora["tuning"]["search"]["trials"][0]["error"] == "ValueError: nope"
    assert prompt["status"] == "ok" and prompt["tuning"]["chosen"] == {"lr": 3e-3}
    assert res["results"][1]["run_info"]["lr"] == 3e-3
    assert "lora" in (tmp_path / "report.md").read_text().split("## Failed runs")[1]


def test_module_sizes_stay_readable():
    root = Path(runner.__file__).parent
    for path in [*root.glob("*.py"), Path(sys.modules["peftlab.results"].__file__)]:
        assert len(path.read_text().splitlines()) <= 500, path.name


@pytest.mark.parametrize("key", ["streaming", "packing"])
def test_compare_refuses_streaming_and_packing_in_one_line(key):
    with pytest.raises(ConfigError, match=f"--train {key}=True is not supported by compare"):
        CompareConfig(model="x", quick=True, train_overrides={key: True})
    CompareConfig(model="x", quick=True, train_overrides={key: False})  # off is fine


def test_a_rerun_with_other_threads_resumes_the_search(tmp_path):
    # Threads decide how fast a search runs, not what it finds; the fingerprint that lets a
    # rerun reuse a finished search must not change with --threads.
    one = searches("lora", out=tmp_path, threads=1)["lora"]
    two = searches("lora", out=tmp_path, threads=2)["lora"]
    assert one.fingerprint == two.fingerprint
    assert searches("lora", out=tmp_path, steps=9)["lora"].fingerprint != one.fingerprint


def test_a_comparison_with_fewer_methods_will_not_replace_the_recorded_report(tmp_path, no_workers):
    runner.compare(["lora", "ia3"], model=MODEL, out=tmp_path, quick=True, echo=False)
    before = {p: p.read_bytes() for p in (tmp_path / "report.md", tmp_path / "plan.json")}
    with pytest.raises(ConfigError, match=r"runs this one leaves out \(ia3\).*same methods"):
        run_compare(tmp_path)  # lora alone
    assert {p: p.read_bytes() for p in before} == before  # refused: nothing rewritten
    run_compare(tmp_path, report=False)  # no report to replace: resuming one method is fine
    with pytest.raises(ConfigError, match="leaves out"):  # and ia3 is still recorded
        run_compare(tmp_path)
    runner.compare(["lora", "ia3", "dora"], model=MODEL, out=tmp_path, quick=True, echo=False)
    assert "dora" in (tmp_path / "report.md").read_text()  # extending it is fine too


def test_a_tuned_comparison_never_replaces_results_its_search_did_not_choose(
    tmp_path, no_workers, monkeypatch
):
    """A search that fails records every run of its method as failed: over another
    comparison's results that was data loss. They are refused before anything runs."""
    run_compare(tmp_path)  # untuned: lora.json holds an ok run
    kept = (tmp_path / "lora.json").read_bytes()
    monkeypatch.setattr(runner, "_spawn", lambda args, log, timeout: 1)  # every search fails
    with pytest.raises(ConfigError, match="lora.json holds a lora run that this comparison's"):
        run_compare(tmp_path, tune=("lr",))
    assert (tmp_path / "lora.json").read_bytes() == kept
    # A recorded search of other settings is not overwritten either.
    other = tmp_path / "elsewhere"
    res = run_compare(other, tune=("lr",))  # its search fails and is recorded as failed
    assert res["results"][0]["train_info"]["status"] != "ok"
    record = (other / "compare-runs" / "search" / "lora.json").read_bytes()
    with pytest.raises(ConfigError, match="lora search made with different settings"):
        run_compare(other, tune=("lr",), steps=7)
    assert (other / "compare-runs" / "search" / "lora.json").read_bytes() == record


def test_jobs_run_methods_side_by_side_and_mark_their_timings(tmp_path, no_workers, capsys):
    import threading
    import time

    seen = set()
    spawn = runner._spawn

    def spawn_noting_threads(args, log, timeout):
        seen.add(threading.get_ident())
        time.sleep(0.2)  # a worker takes a while: the pool's second thread starts meanwhile
        return spawn(args, log, timeout)

    runner._spawn = spawn_noting_threads  # restored by no_workers' monkeypatch
    res = runner.compare(["lora", "ia3", "dora"], model=MODEL, out=tmp_path, quick=True, jobs=2)
    assert [r["run_info"]["method"] for r in res["results"]] == ["lora", "ia3", "dora"]
    assert len(seen) == 2  # two pool threads each waited on its own worker
    for r in res["results"]:
        assert r["train_info"]["timing"]["reliable"] is False
        assert "--jobs 2" in r["train_info"]["timing"]["why"]
        assert r["meta_info"]["load"]["jobs"] == 2
        assert r["meta_info"]["load"]["threads_from"] == "cores / --jobs 2"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {r["name"] for r in plan["runs"]} == {"lora", "ia3", "dora"}
    numbers = sorted(re.findall(r"\[(\d)/3\] \w+: training", capsys.readouterr().out))
    assert numbers == ["1", "2", "3"]
    with pytest.raises(ConfigError, match="jobs must be an integer"):
        CompareConfig(["lora"], model=MODEL, jobs=0)


def test_jobs_start_no_further_method_after_an_error(tmp_path, no_workers):
    import time

    spawned, spawn = [], runner._spawn

    def failing(args, log, timeout):
        name = Path(args[-1]).name
        spawned.append(name)
        if name.startswith("lora"):
            time.sleep(0.1)
            raise KeyboardInterrupt  # as Ctrl-C reaches a waiting worker call
        time.sleep(0.5)
        return spawn(args, log, timeout)

    runner._spawn = failing  # restored by no_workers' monkeypatch
    with pytest.raises(KeyboardInterrupt):
        runner.compare(["lora", "ia3", "dora"], model=MODEL, out=tmp_path, quick=True, jobs=2,
                       echo=False)  # fmt: skip
    assert not any(n.startswith("dora") for n in spawned), spawned  # never started
