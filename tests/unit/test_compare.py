"""The comparison lab's statistics, claim criteria, report and runner bookkeeping, on synthetic
results (no training), so each definition is pinned by numbers worked out by hand."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
import torch

from peftlab.bench import claims, inference, measure, report, runner
from peftlab.bench.spec import FULL, QUICK, CompareConfig, RunSpec
from peftlab.cli import compare as compare_cli
from peftlab.core.config import ConfigError
from peftlab.results import Quality, RunResult, quality

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"

# ---------------------------------------------------------------- statistics


def test_loss_spikes_counts_jumps_over_the_rolling_median():
    flat = [1.0] * 20
    assert measure.loss_spikes(flat) == 0
    curve = flat[:]
    curve[12] = 1.6  # 1.6 > 1.5 × median(1.0)
    curve[15] = 1.4  # below the threshold
    curve[18] = float("nan")  # a non-finite loss is a spike
    assert measure.loss_spikes(curve) == 2
    # The first SPIKE_WINDOW losses have no history and are never spikes.
    assert measure.loss_spikes([1.0, 9.0] + flat) == 0


def test_loss_variability_is_std_of_log_steps():
    assert measure.loss_variability([2.0 * 0.9**k for k in range(10)]) == pytest.approx(
        0.0, abs=1e-12
    )
    zigzag = [1.0, 1.1] * 10 + [1.0]  # 10 steps up, 10 down
    d = math.log(1.1)
    assert measure.loss_variability(zigzag) == pytest.approx(d, rel=1e-9)  # steps ±d → std d
    assert measure.loss_variability([1.0, 0.5]) is None


def test_speed_drops_warmup_and_takes_medians():
    recs = [{"step_time": 10.0, "tokens": 100}] * 3 + [
        {"step_time": t, "tokens": 100} for t in (1.0, 2.0, 4.0)
    ]
    s = measure.speed(recs, warmup=3)
    assert s["step_time_median_s"] == 2.0
    assert s["tokens_per_s"] == 50.0  # median of 100, 50, 25
    assert s["timed_steps"] == 3


def test_spread_needs_two_values():
    assert measure.spread([1.0, None]) is None
    s = measure.spread([1.0, 3.0])
    assert (s["mean"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert s["std"] == pytest.approx(math.sqrt(2))


_PEAK_PROBE = """
import time
import torch
from peftlab.bench import measure
with measure.PeakMemory("cpu") as pm:
    start = measure.rss_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    x += 1
    time.sleep(0.1)  # the live-heap figure is sampled (1 ms): hold the block past a sample
    del x
print(pm.peak_bytes - start, pm.method)
"""


def test_peak_memory_sees_an_allocation():
    # In a fresh process: inside the test session, memory freed by earlier tests stays
    # resident in the heap and an allocation can reuse it without raising RSS.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True
    )
    grown, method = out.stdout.split(maxsplit=1)
    assert int(grown) > 60 * 2**20, method


_LIVE_PROBE = """
import gc, json, time
import torch
from peftlab.bench import measure
gc.collect()
before = measure.live_heap_bytes()
with measure.PeakMemory("cpu") as pm:
    x = torch.ones(32 * 2**20 // 4)  # 32 MiB
    held = measure.live_heap_bytes()
    time.sleep(0.01)  # the sampler ticks every millisecond
    del x
after = measure.live_heap_bytes()
print(json.dumps([before, held, after, pm.peak_live_bytes, pm.to_dict()["live_bytes"]]))
"""


def test_live_heap_bytes_track_a_tensor_and_its_release():
    # In a fresh process, so no other test's threads allocate meanwhile.
    import json
    import subprocess
    import sys

    if measure.live_heap_bytes() is None:
        pytest.skip("no glibc mallinfo2 here")
    out = subprocess.run(
        [sys.executable, "-c", _LIVE_PROBE], capture_output=True, text=True, check=True
    )
    before, held, after, peak, reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert held - before == pytest.approx(32 * 2**20, rel=0.05)
    assert after - before < 2**20  # freed memory is not live, whatever RSS says
    assert peak - before >= 32 * 2**20
    assert reported == peak


def test_time_inference_on_tiny_models():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    batch = {
        "input_ids": torch.randint(0, 128, (2, 6)),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    timed = inference.time_inference(
        {"a": model, "b": tiny_llama(1)}, batch, new_tokens=4, repeats=1
    )
    assert set(timed) == {"a", "b"}
    s = timed["a"]
    assert s["prefill_s"] > 0 and s["decode_tokens_per_s"] > 0
    r = inference.overhead_ratios(
        s, {"prefill_s": 2 * s["prefill_s"], "decode_tokens_per_s": s["decode_tokens_per_s"] / 4}
    )
    assert r["prefill_latency_ratio"] == pytest.approx(2.0)
    assert r["decode_speed_ratio"] == pytest.approx(0.25)
    assert claims.overhead_fraction(r) == pytest.approx(3.0)  # 4× slower decode dominates


# ---------------------------------------------------------------- synthetic results


def assert_self_contained(page: str, figures: int) -> None:
    """``figures`` embedded PNGs, and nothing the page would fetch from elsewhere."""
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]{100,})"', page)
    assert len(images) == figures
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|//[a-z0-9]|@import|<link|<script", rest, re.I), (
        "external reference"
    )
    assert (
        re.findall(r'(?:src|href)="([^"]*)"', rest) == [""] * figures
    )  # only the stripped data URIs


def fake_result(
    method, trainable, total, mem_total, overhead=0.0, seed=0, losses=None, mergeable=True, acc=0.8
):
    losses = losses or [2.0 * 0.95**k for k in range(30)]
    base = {"prefill_s": 0.1, "decode_tokens_per_s": 100.0}
    slowed = {"prefill_s": 0.1 * (1 + overhead), "decode_tokens_per_s": 100.0 / (1 + overhead)}
    return {
        "run_info": {
            "method": method,
            "model": "tiny",
            "kind": "causal-lm",
            "data": "builtin:sort",
            "seed": seed,
            "steps": len(losses),
            "batch_size": 4,
            "max_length": 32,
            "device": "cpu",
            "fingerprint": "x",
        },
        "train_info": {
            "status": "ok",
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "adapter_bytes": 4 * trainable,
            "peak_memory": {"bytes": mem_total // 2, "total_bytes": mem_total},
            "step_time_median_s": 1.0,
            "tokens_per_s": 100.0,
            "loss_curve": [[i + 1, v] for i, v in enumerate(losses)],
            "final_loss": losses[-1],
            "stability": {
                "loss_spikes": measure.loss_spikes(losses),
                "loss_variability": measure.loss_variability(losses),
            },
            "eval": {
                "eval_loss": losses[-1],
                "eval_ppl": math.exp(losses[-1]),
                "eval_exact_match": acc,
            },
            "inference": {
                "base": base,
                "unmerged": slowed,
                "merged": base if mergeable else None,
                "unmerged_vs_base": inference.overhead_ratios(base, slowed),
                "merged_vs_base": inference.overhead_ratios(base, base) if mergeable else None,
            },
            "mergeable": mergeable,
        },
        "meta_info": {"host": "h", "versions": {"torch": torch.__version__}},
    }


def study():
    total = 1_000_000
    return [
        fake_result("full", total, total, 4000),
        fake_result("lora", 5_000, total, 1600, overhead=0.3),
        fake_result("dora", 5_500, total, 1650, overhead=0.6),
        fake_result("adapter", 20_000, total, 1700, overhead=0.2, mergeable=False),
        fake_result(
            "prefix",
            2_000,
            total,
            1450,
            overhead=0.1,
            mergeable=False,
            losses=[1.0] * 12 + [2.0] + [1.0] * 10 + [3.0] + [1.0] * 5 + [2.5],
        ),
    ]


def claim(rows, method, column):
    (row,) = [r for r in rows if r["method"] == method and r["column"] == column]
    return row


def test_claims_follow_the_documented_criteria():
    rows = claims.check_claims(report.summarize(study()))
    assert claim(rows, "full", "trainable params")["verdict"] == "held"
    assert claim(rows, "lora", "trainable params")["verdict"] == "held"  # 0.5% in 0.1–1%
    assert claim(rows, "adapter", "trainable params")["verdict"] == "held"  # 2%
    assert claim(rows, "prefix", "trainable params")["verdict"] == "above the range"  # 0.2% > 0.1%
    dora = claim(rows, "dora", "trainable params")
    assert dora["verdict"] == "held" and "+500 vs lora" in dora["measured"]
    # memory: full is the reference (high); 1600/4000 = 0.4 → low; prefix 1450 is the smallest.
    assert claim(rows, "full", "memory")["verdict"] == "held"
    assert claim(rows, "lora", "memory")["verdict"] == "held"
    assert (
        claim(rows, "adapter", "memory")["verdict"] == "better than claimed"
    )  # low, claimed medium
    assert claim(rows, "prefix", "memory")["measured"].startswith("very low")
    # overhead uses the merged form where the method merges: LoRA merged = base → very low.
    assert claim(rows, "lora", "inference overhead")["verdict"] == "held"
    assert claim(rows, "adapter", "inference overhead")["verdict"] == "held"  # 20% → medium
    assert claim(rows, "prefix", "inference overhead")["verdict"] == "held"  # 10% → low
    # stability: 3 spikes → low, worse than the claimed medium.
    assert claim(rows, "prefix", "training stability")["verdict"] == "worse than claimed"
    assert claim(rows, "lora", "training stability")["verdict"] == "held"
    for r in (
        claim(rows, m, c) for m in ("qlora", "ptuning-v2") for c in ("memory", "trainable params")
    ):
        assert r["verdict"] == "not measured"


def test_memory_claims_need_full_as_reference():
    rows = claims.check_claims(report.summarize(study()[1:]))
    assert claim(rows, "lora", "memory")["verdict"] == "not measured"


def test_seed_spread_enters_summary_and_stability():
    runs = [
        fake_result("lora", 5, 1000, 10, seed=0),
        fake_result("lora", 5, 1000, 10, seed=1, losses=[3.0 * 0.95**k for k in range(30)]),
    ]
    s = report.summarize(runs)["lora"]
    assert s["seeds"] == 2 and s["final_loss_spread"]["n"] == 2
    assert s["seed_cv"] == pytest.approx(
        s["final_loss_spread"]["std"] / s["final_loss_spread"]["mean"]
    )
    assert (
        claims.stability_level(s["stability"], s["stability"]["loss_variability"], s["seed_cv"])
        == "medium"
    )


def test_report_is_self_contained(tmp_path):
    results = study()
    results.append(
        {
            "run_info": {"method": "qlora", "seed": 0},
            "meta_info": {},
            "train_info": {"status": "failed", "error": "RuntimeError: boom"},
        }
    )
    paths = report.write_report(tmp_path, results, echo=False)
    assert_self_contained((tmp_path / "report.html").read_text(), figures=4)
    md = (tmp_path / "report.md").read_text()
    assert "RuntimeError: boom" in md and "| lora |" in md and "LoRA" in md
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        "loss_curves.png",
        "memory.png",
        "speed.png",
        "params_vs_quality.png",
    }
    assert paths["summary"]["qlora"]["status"] == "failed"
    json.loads((tmp_path / "summary.json").read_text())


# ---------------------------------------------------------------- runner bookkeeping


def plan(*args, **kwargs):
    return runner.plan(CompareConfig(*args, **kwargs))


def test_plan_validates_its_inputs(tmp_path):
    with pytest.raises(ConfigError, match="seeds must be at least 1"):
        plan(["lora"], model="smollm2-135m", seeds=0, out=tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        plan(["nope"], model="smollm2-135m", out=tmp_path)
    with pytest.raises(ConfigError, match="no built-in classification task"):
        plan(["lora"], model="minilm-l6", out=tmp_path)
    with pytest.raises(ConfigError, match="r=0"):  # before any run starts
        plan(["lora"], model="smollm2-135m", method_args={"lora": {"r": 0}}, out=tmp_path)
    with pytest.raises(ConfigError, match="no_such_key"):
        plan(["lora"], model="smollm2-135m", train_overrides={"no_such_key": 1}, out=tmp_path)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        compare_cli._train_overrides(["data_size"])
    with pytest.raises(ConfigError, match="METHOD.OPTION=VALUE"):
        compare_cli._method_args(["r=16"])
    assert compare_cli._method_args(["lora.r=16", "lora.target_modules=[q_proj]"]) == {
        "lora": {"r": 16, "target_modules": ["q_proj"]}
    }


def test_plan_gives_every_method_the_same_budget(tmp_path):
    specs = plan(["lora", "full"], model="smollm2-135m", seeds=2, out=tmp_path, quick=True)
    assert [s.name for s in specs] == ["lora-seed0", "lora-seed1", "full-seed0", "full-seed1"]
    for key in ("steps", "batch_size", "max_length", "data", "inference", "train_overrides"):
        assert len({json.dumps(s.to_json()[key]) for s in specs}) == 1, key
    assert {s.lr for s in specs if s.method == "full"} == {5e-5}
    assert len({s.fingerprint for s in specs}) == 4


def test_resume_skips_done_runs_and_refuses_other_settings(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(spec, timeout=None):
        calls.append(spec.name)
        res = fake_result(spec.method, 5, 1000, 10)
        res["run_info"]["fingerprint"] = spec.fingerprint
        if spec.method == "dora":
            res["train_info"] = {"status": "failed", "error": "boom"}
        (tmp_path / f"{spec.name}.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    kw = dict(model="smollm2-135m", out=tmp_path, quick=True, report=False, echo=False)
    runner.compare(["lora", "dora"], **kw)
    assert calls == ["lora", "dora"]
    runner.compare(["lora", "dora"], **kw)
    assert calls == ["lora", "dora"]  # nothing rerun; the failure stays recorded
    runner.compare(["lora", "dora"], retry_failed=True, **kw)
    assert calls == ["lora", "dora", "dora"]
    (tmp_path / "dora.json").unlink()
    res = runner.compare(["lora", "dora"], report_only=True, **{**kw, "report": True})
    assert calls == ["lora", "dora", "dora"]  # report_only runs nothing
    assert [r["run_info"]["method"] for r in res["results"]] == ["lora"]
    assert "| lora |" in (tmp_path / "report.md").read_text()
    (tmp_path / "lora.json").unlink()
    with pytest.raises(ConfigError, match="no results"):
        runner.compare(["lora", "dora"], report_only=True, **kw)
    runner.compare(["lora"], **kw)
    with pytest.raises(ConfigError, match="different settings"):
        runner.compare(["lora"], steps=3, **kw)


# ---------------------------------------------------------------- one memory measurement


def test_peak_memory_refuses_to_nest_and_phases_do_not_overlap():
    with measure.PeakMemory("cpu") as pm:
        with pytest.raises(RuntimeError, match="cannot nest"), measure.PeakMemory("cpu"):
            pass
        with pm.phase("a"), pytest.raises(RuntimeError, match="phases do not nest"):
            pm.begin_phase("b")
        assert set(pm.phases) == {"a"}
    with pytest.raises(RuntimeError, match="not running"):
        pm.begin_phase("late")
    with measure.PeakMemory("cpu"):  # the refused one left nothing behind
        pass


_NEST_PROBE = """
import json
import time
import torch
from peftlab.bench import measure
with measure.PeakMemory("cpu") as pm:
    start, live0 = measure.rss_bytes(), measure.live_heap_bytes()
    x = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched, freed before the loop phase
    x += 1
    time.sleep(0.1)  # the live-heap figure is sampled (1 ms): hold the block past a sample
    del x
    try:
        with measure.PeakMemory("cpu"):
            nested = "entered"
    except RuntimeError as e:
        nested = str(e)
    with pm.phase("loop") as loop:
        y = torch.ones(16 * 2**20 // 4)
        y += 1
        time.sleep(0.1)
        del y
print(json.dumps({"start": start, "live0": live0, "peak": pm.peak_bytes,
                  "live_peak": pm.peak_live_bytes, "loop": loop.to_dict(), "nested": nested}))
"""


def test_outer_peak_keeps_an_allocation_made_before_the_loop_phase():
    # The compare worker's one measurement spans apply (QLoRA's quantization transient) and
    # the loop, which is a phase of it: the phase's counter reset must not erase what came
    # before. A fresh process, so memory freed by other tests does not hide the allocation.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _NEST_PROBE], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "cannot nest" in r["nested"]
    mib = 2**20
    assert r["peak"] - r["start"] > 190 * mib, r  # the 200 MiB made before the phase counts
    assert r["loop"]["bytes"] - r["start"] < 100 * mib, r  # the loop's own peak does not
    assert r["loop"]["before_bytes"] - r["start"] > 190 * mib, r  # it came before the loop
    if r["live0"] is not None:  # glibc: live heap bytes, the estimator's figure
        assert r["live_peak"] - r["live0"] >= 200 * mib
        loop_live = r["loop"]["live_bytes"] - r["loop"]["live_bytes_at_start"]
        assert 16 * mib <= loop_live < 100 * mib


# ---------------------------------------------------------------- typed spec and result


def test_spec_keeps_the_json_layout_and_fingerprint_of_earlier_versions(tmp_path):
    # Fingerprints computed by peftlab fe141dd (spec dicts): old output directories resume.
    specs = plan(["lora", "full"], model="smollm2-135m", seeds=2, out=tmp_path, quick=True,
                 device="cpu")  # fmt: skip
    assert [s.fingerprint for s in specs] == [
        "a4a22a8b0930deb0", "2ae5425dc6fcc88c", "f2fa9cafc0a7eb9b", "415dee61de779b24",
    ]  # fmt: skip
    (spec,) = plan(["qlora"], model="smollm2-135m", out=tmp_path, device="cpu", threads=1,
                   seeds=1, method_args={"qlora": {"r": 4}},
                   train_overrides={"data_size": 100})  # fmt: skip
    assert spec.fingerprint == "f720e1b351a4a39f"
    data = spec.to_json()
    assert list(data) == [
        "name", "method", "method_args", "model", "kind", "data", "seed", "steps", "batch_size",
        "max_length", "lr", "device", "threads", "inference", "train_overrides", "run_dir",
        "result_path", "fingerprint",
    ]  # fmt: skip
    assert data["inference"] == {"new_tokens": 12, "repeats": 3, "max_prompt_length": 64}
    assert RunSpec.from_json(json.loads(json.dumps(data))) == spec
    assert spec.train_config()["max_steps"] == 25 and spec.train_config()["data_size"] == 100


def test_plan_defaults_to_every_registered_method(tmp_path):
    from peftlab.core.registry import methods

    assert [s.method for s in plan(model="smollm2-135m", out=tmp_path, quick=True)] == methods()


def test_compare_docstring_states_the_real_budgets():
    doc = " ".join(runner.compare.__doc__.split())
    assert f"default {FULL.steps}" in doc and f"{QUICK.steps} with ``quick``" in doc
    assert f"batch {QUICK.batch_size} instead of {FULL.batch_size}" in doc


def test_result_round_trips_and_failed_results_stay_small():
    r = RunResult.from_json(fake_result("lora", 5, 1000, 10))
    assert r.method == "lora" and r.ok and r.train_info.peak_memory.total_bytes == 10
    again = RunResult.from_json(json.loads(json.dumps(r.to_json())))
    assert again == r
    failed = {"run_info": {"method": "x"}, "train_info": {"status": "failed", "error": "e"}}
    assert RunResult.from_json(failed).to_json()["train_info"] == failed["train_info"]
    with pytest.raises(ValueError, match="not a peftlab compare result"):
        RunResult.from_json({"runs": []})  # plan.json


def test_quality_is_accuracy_else_exact_match_else_eval_loss():
    r = fake_result("lora", 5, 1000, 10, acc=0.8)
    assert quality(r) == Quality("exact_match", 0.8, True)
    r["train_info"]["eval"]["eval_accuracy"] = 0.7
    assert quality(r) == Quality("accuracy", 0.7, True)
    r["train_info"]["eval"] = {"eval_loss": 1.5, "eval_ppl": math.exp(1.5)}
    assert quality(r) == Quality("loss", 1.5, False)
    r["train_info"]["eval"] = {}
    assert quality(r) is None
    assert quality({"run_info": {}, "train_info": {"status": "failed"}}) is None


def test_report_and_recommend_read_the_same_quality(tmp_path):
    import peftlab

    losses = {"lora": 0.5, "prompt": 1.0}
    results = []
    for method, loss in losses.items():
        r = fake_result(method, 5, 1000, 10)
        r["train_info"]["eval"] = {"eval_loss": loss}  # no score: the loss is the quality
        results.append(r)
        (tmp_path / f"{method}.json").write_text(json.dumps(r))
    summary = report.summarize(results)
    assert summary["lora"]["metric_name"] == "loss" and summary["prompt"]["metric"] == 1.0
    recs = {
        r.method: r for r in peftlab.recommend("smollm2-135m", 8, results=tmp_path, device="cpu")
    }
    assert recs["lora"].quality == 1.0
    assert recs["prompt"].quality == pytest.approx(math.exp(0.5 - 1.0), abs=1e-3)


def test_report_quotes_the_claims_criteria():
    summary = report.summarize(study())
    md = report._markdown([], report._sections(summary, claims.check_claims(summary)), {})
    assert all(f"- {c}" in md for c in claims.CRITERIA) and len(claims.CRITERIA) == 4
    assert "**Memory**" in md and "QLoRA's quantization included" in md


@pytest.mark.parametrize("run_dir", sorted(RESULTS.glob("compare-*")), ids=lambda p: p.name)
def test_published_results_load_and_summarize_as_before(run_dir):
    # Results written before the typed RunResult existed: the summary is unchanged, except
    # that a run scored by no metric now takes its eval loss as quality (quality()).
    results = [r for p in sorted(run_dir.glob("*.json")) if (r := RunResult.load(p))]
    published = json.loads((run_dir / "summary.json").read_text())["methods"]
    summary = json.loads(json.dumps(report.summarize(results), default=str))
    assert set(summary) == set(published)
    for method, old in published.items():
        new = summary[method]
        if old.get("status") != "failed" and old["metric_name"] is None:
            assert (new["metric_name"], new["metric"]) == ("loss", old["eval_loss"])
            old = {k: v for k, v in old.items() if k not in ("metric_name", "metric")}
        assert {k: new[k] for k in old} == old, method
