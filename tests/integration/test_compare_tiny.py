"""``peftlab compare`` end to end on a tiny Llama saved as a Hugging Face directory: real worker
processes, a kill and resume, a failing method, every field of the result JSON, and a report
whose HTML carries its figures inline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peftlab
from peftlab.results import RunResult
from tests.tiny_lm import save_tiny_lm
from tests.unit.test_compare import assert_self_contained

REPO = Path(__file__).resolve().parents[2]
# The char-level tokenizer spends one token per character, so the built-in sorting prompts
# need ~100 tokens; 3 steps of 4 examples are enough to exercise every measurement.
SETTINGS = ["--steps", "3", "--batch-size", "4", "--max-length", "128", "--quick"]
KW = dict(steps=3, batch_size=4, max_length=128, quick=True)

RUN_INFO = {
    "method",
    "method_args",
    "model",
    "kind",
    "data",
    "seed",
    "steps",
    "batch_size",
    "max_length",
    "lr",
    "fingerprint",
    "start",
    "end",
    "device",
    "argv",
}
TRAIN_INFO = {
    "status",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "adapter_bytes",
    "peak_memory",
    "step_time_median_s",
    "tokens_per_s",
    "timed_steps",
    "warmup_steps",
    "train_seconds",
    "model_load_seconds",
    "loss_curve",
    "eval_curve",
    "final_loss",
    "stability",
    "eval",
    "inference",
    "mergeable",
    "trains_base",
    "method_config",
    "train_summary",
}
META_INFO = {
    "host",
    "platform",
    "python",
    "cpu_count",
    "torch_threads",
    "load_average",
    "cuda_device",
    "versions",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


def cli(tiny: str, out: Path, methods: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "peftlab.cli",
        "compare",
        "--model",
        tiny,
        "--methods",
        methods,
        "--out",
        str(out),
        *SETTINGS,
    ]


def check_ok_result(r: dict, method: str, tiny: str) -> None:
    assert set(r) == {"run_info", "train_info", "meta_info"}
    ri, ti, mi = r["run_info"], r["train_info"], r["meta_info"]
    assert (
        set(ri) >= RUN_INFO and ri["method"] == method and ri["model"] == tiny and ri["steps"] == 3
    )
    assert set(ti) >= TRAIN_INFO and ti["status"] == "ok", ti.get("error")
    assert set(mi) >= META_INFO and {"torch", "transformers", "bitsandbytes", "peftlab"} <= set(
        mi["versions"]
    )

    model = peftlab.apply(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny),
        peftlab.config_from_dict(ti["method_config"]),
    )
    assert (ti["trainable_params"], ti["total_params"]) == peftlab.trainable_parameters(model)
    assert ti["trainable_percent"] == pytest.approx(
        100 * ti["trainable_params"] / ti["total_params"]
    )
    assert ti["adapter_bytes"] >= 4 * ti["trainable_params"]  # fp32 tensors + config file
    pm = ti["peak_memory"]
    assert (
        pm["total_bytes"] > 0
        and pm["peak_process_bytes"] > pm["rss_after_load_bytes"] > 0
        and pm["how"]
    )
    assert pm["weights_bytes"] == pm["trainable_bytes"] + pm["frozen_bytes"] + pm["buffer_bytes"]
    pred = pm["prediction"]  # the estimator beside the measurement, for the run's own settings
    assert pred["predicted_bytes"] > pm["weights_bytes"] and pred["seq_len"] > 0, pred
    # The loop is a phase of the worker's one measurement, whose peak covers it and setup.
    loop = pm["loop"]
    assert (
        pm["peak_process_bytes"] >= loop["bytes"] > 0
        and loop["how"] == pm["how"].split(" minus")[0]
    )
    assert loop["model_tensor_bytes"] > 0 and pm["peak_process_bytes"] >= loop["before_bytes"] > 0
    assert loop["longest_batch"] == ti["train_summary"]["longest_batch"] > 0
    assert "peak_memory" not in ti["train_summary"]  # the trainer measures nothing
    if pred["measured_bytes"] is not None:  # glibc: live heap bytes were sampled
        assert pred["measured_bytes"] > 0 and "error_ratio" in pred
        assert loop["live_bytes"] >= loop["live_bytes_at_start"] > 0
    assert RunResult.from_json(r).to_json() == r  # the typed result is the JSON, key for key
    assert ti["step_time_median_s"] > 0 and ti["tokens_per_s"] > 0 and ti["train_seconds"] > 0
    assert [s for s, _ in ti["loss_curve"]] == [1, 2, 3] and ti["final_loss"] == ti["loss_curve"][
        -1
    ][1]
    assert ti["stability"]["loss_spikes"] == 0 and ti["stability"]["definition"]
    assert ti["stability"]["loss_variability"] >= 0
    assert {"eval_loss", "eval_ppl", "eval_exact_match"} <= set(ti["eval"])
    inf = ti["inference"]
    for form in ("base", "unmerged"):
        assert inf[form]["prefill_s"] > 0 and inf[form]["decode_tokens_per_s"] > 0
    assert inf["unmerged_vs_base"]["prefill_latency_ratio"] > 0
    assert (inf["merged"] is not None) == ti["mergeable"] == (inf["merged_vs_base"] is not None)
    assert ti["train_summary"]["steps"] == 3


def test_killed_comparison_resumes_without_rerunning_the_finished_method(tiny, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        cli(tiny, out, "lora,adapter"),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (out / "lora.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker, mid-way through "adapter"
    proc.wait()
    first = (out / "lora.json").read_text()
    assert not (out / "adapter.json").exists(), "the kill came too late to test resuming"

    res = subprocess.run(
        cli(tiny, out, "lora,adapter"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lora: already done (ok), skipped" in res.stdout
    assert (out / "lora.json").read_text() == first  # not rerun

    for method in ("lora", "adapter"):
        check_ok_result(json.loads((out / f"{method}.json").read_text()), method, tiny)
    # The untrained model is scored once for both methods (one seed: one shared file).
    assert len(list((out / "compare-runs" / "baselines").glob("*.json"))) == 1
    base = [json.loads((out / f"{m}.json").read_text())["train_info"]["baselines"] for m in
            ("lora", "adapter")]  # fmt: skip
    assert base[0]["base_model"] == base[1]["base_model"] and "loss" in base[0]["base_model"]
    adapter = json.loads((out / "adapter.json").read_text())["train_info"]
    assert not adapter["mergeable"] and adapter["inference"]["merged"] is None
    assert "lora" in res.stdout and "trainable params" in res.stdout  # the summary table
    assert_self_contained((out / "report.html").read_text(), figures=4)
    md = (out / "report.md").read_text()
    assert "| lora |" in md and "| adapter |" in md and "LoRA" in md


def test_failing_method_is_recorded_and_the_rest_go_on(tiny, tmp_path):
    res = peftlab.compare(
        ["dora", "lora"],
        model=tiny,
        out=tmp_path,
        method_args={"dora": {"target_modules": ["no_such_module"]}},
        echo=False,
        **KW,
    )
    failed, ok = (r["train_info"] for r in res["results"])
    # A target that matches nothing passes config validation and fails in the worker's apply.
    assert failed["status"] == "failed" and "no_such_module" in failed["error"]
    assert "Traceback" in failed["traceback"]
    assert json.loads((tmp_path / "dora.json").read_text())["train_info"]["status"] == "failed"
    assert ok["status"] == "ok" and ok["final_loss"] is not None
    assert "dora" in (tmp_path / "report.md").read_text().split("## Failed runs")[1]


def test_a_raising_user_metric_fails_each_run_in_one_line_and_the_comparison_goes_on(
    tiny, tmp_path, monkeypatch
):
    (tmp_path / "scorer_for_compare.py").write_text(
        "def broken(preds, refs):\n    raise RuntimeError('the scorer is broken')\n"
    )
    monkeypatch.chdir(tmp_path)  # the metric lives beside the data, in the current directory
    kw = {**KW, "steps": 2}
    res = peftlab.compare(["lora", "ia3"], model=tiny, out=tmp_path / "cmp", echo=False,
                          train_overrides={"metric": "scorer_for_compare:broken"}, **kw)  # fmt: skip
    want = (
        "MetricError: metric='scorer_for_compare:broken' raised RuntimeError: the scorer is broken"
    )
    assert [r["train_info"]["error"] for r in res["results"]] == [want, want]
    assert "ia3" in (tmp_path / "cmp" / "report.md").read_text().split("## Failed runs")[1]
