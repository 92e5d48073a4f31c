"""The benchmark scripts still run: their workers on a tiny Llama for a step, the driver's
bookkeeping, and the saved-activation counts that back the LoRA/DoRA memory claims.
No timing is asserted (timings belong to the benchmarks, on a quiet machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import graph_cost, harness, inference, train_step

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny", "--batch", "2", "--seq", "16", "--warmup", "1", "--steps", "1"]


def _train(config: str) -> dict:
    return train_step.worker(train_step.parse_args(["--config", config, *TINY]))


@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_train_configs_train_the_same_parameters_as_peft(method):
    pytest.importorskip("peft")
    ours, theirs = _train(f"peftlab-{method}-all"), _train(f"peft-{method}-all")
    assert ours["trainable_params"] == theirs["trainable_params"] > 0
    assert ours["last_loss"] != ours["first_loss"]


@pytest.mark.parametrize("config", ["floor", "peftlab-lora-all", "peftlab-dora-all", "full"])
def test_train_worker_reports_a_step(config):
    r = _train(config)
    assert r["step_s"] > 0 and r["peak_rss_gb"] > 0 and r["train_peak_rss_gb"] > 0
    assert (r["trainable_params"] == 0) == (config == "floor")
    if config != "floor":  # an optimizer step happened: the loss moved
        assert r["last_loss"] != r["first_loss"]


def test_profiled_steps_report_operator_time():
    r = train_step.worker(
        train_step.parse_args(["--config", "peftlab-lora-all", *TINY, "--profile-steps", "1"])
    )
    assert 0 < r["mm_s"] < r["op_s"]
    lines: list[str] = []
    train_step.report({"floor": {**r, "n": 1}, "peftlab-lora-all": {**r, "n": 1}}, out=lines.append)
    assert "op time" in "\n".join(lines)


def test_peft_side_matches_peftlab_loss():
    pytest.importorskip("peft")
    ours, theirs = _train("peftlab-lora-all"), _train("peft-lora-all")
    assert ours["trainable_params"] == theirs["trainable_params"]
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-6)


def test_qlora_worker_counts_4bit_storage():
    pytest.importorskip("bitsandbytes")
    r = _train("peftlab-qlora-all")
    # NF4 codes (4 bits) + 8-bit absmax per 64 + fp32 per 256 absmax: ~4.127 bits per weight.
    assert 4.1 < r["quant_bits_per_param"] < 4.2


def test_inference_worker_merged_lora():
    args = inference.parse_args(
        [
            "--config",
            "peftlab-lora-merged",
            "--model",
            "tiny",
            "--seq",
            "8",
            "--new-tokens",
            "2",
            "--reps",
            "1",
        ]
    )
    r = inference.worker(args)
    assert r["prefill_s"] > 0 and r["decode_s_per_token"] > 0


def test_report_ratios_and_verdicts():
    runs = {
        "floor": [{"step_s": 2.0, "peak_rss_gb": 1.8, "trainable_params": 0}] * 3,
        "peftlab-lora-all": [
            {"step_s": s, "peak_rss_gb": 2.0, "trainable_params": 9} for s in (2.1, 2.2, 9.0)
        ],
        "peft-lora-all": [
            {"step_s": 2.6, "peak_rss_gb": 2.4, "trainable_params": 9},
            {"error": "x"},
        ],
    }
    med = harness.medians(runs)
    assert med["peftlab-lora-all"]["step_s"] == 2.2 and med["peft-lora-all"]["n"] == 1
    lines: list[str] = []
    rows = {label: (r, v) for label, r, _, v in train_step.report(med, out=lines.append)}
    assert rows["LoRA all-linear step / floor"] == (pytest.approx(1.1), "PASS")
    assert rows["LoRA all-linear memory / peft"] == (pytest.approx(2.0 / 2.4), "PASS")
    assert rows["DoRA step / peft DoRA"] == (None, "n/a ")


def test_driver_runs_a_worker_process():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--configs",
            "floor",
            "--repeats",
            "1",
            *TINY,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "floor" in out.stdout and "error" not in out.stdout


def test_dora_saves_less_for_backward_than_peft():
    """Deterministic activation counts: DoRA keeps one (…, out) tensor per layer, not two."""
    pytest.importorskip("peft")
    args = train_step.parse_args(TINY)
    args.device = "cpu"
    saved = {
        c: graph_cost.measure(args, c)["saved_gb"]
        for c in ("peftlab-lora-all", "peft-lora-all", "peftlab-dora-all", "peft-dora-all")
    }
    assert saved["peftlab-lora-all"] <= saved["peft-lora-all"]
    assert saved["peftlab-dora-all"] < saved["peft-dora-all"]


def test_dora_norm_cache_follows_training_updates():
    """The cached DoRA norm (what makes unmerged decoding cheap) is recomputed after a step."""
    import torch
    from torch import nn

    from peftlab.methods.dora import DoRAConfig, DoRALinear

    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(8, 6))
    layer.add_adapter("default", DoRAConfig(r=2, alpha=4))
    layer.set_adapter(["default"])
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    layer(x).pow(2).sum().backward()
    opt.step()  # B moves off zero: the norm must change
    w = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(layer._norm("default"), w.norm(dim=1).detach())


def test_paired_ratio_pairs_repeats_and_skips_failures():
    from benchmarks.harness import paired_ratio

    raw = {
        "a": [{"t": 2.2}, {"t": 2.0}, {"error": "x"}, {"t": 3.0}],
        "b": [{"t": 2.0}, {"t": 2.0}, {"t": 1.0}, {"t": 2.0}],
    }
    # same-repeat pairs 1.1, 1.0, (repeat 3 failed: skipped), 1.5 → median 1.1
    assert paired_ratio(raw, "a", "b", "t") == pytest.approx(1.1)
    assert paired_ratio(raw, "a", "missing", "t") is None
    assert paired_ratio(None, "a", "b", "t") is None
