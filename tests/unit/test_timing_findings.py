"""Which inference timings of a comparison are findings: the noise floor (the base model
timed in two phases, every model across its rounds) and the verdicts built on it
(peftlab/bench/timing.py)."""

from __future__ import annotations

import pytest

from peftlab.bench import timing


def test_a_merged_adapter_or_full_fine_tuning_never_reads_as_faster():
    faster = {"prefill_latency_ratio": 0.6, "decode_speed_ratio": 1.6}
    f = timing.findings(faster, faster, noise=0.03, trains_base=False)
    assert f["merged"]["finding"] == "within noise" and f["unmerged"]["finding"] == "faster"
    f = timing.findings(faster, faster, noise=0.03, trains_base=True)  # full fine-tuning
    assert f["merged"]["finding"] == f["unmerged"]["finding"] == "within noise"
    slower = {"prefill_latency_ratio": 1.5, "decode_speed_ratio": 0.9}
    assert timing.findings(slower, None, 0.03, False)["unmerged"]["finding"] == "slower"
    base1 = {"prefill_s": 0.10, "decode_tokens_per_s": 100.0}
    base2 = {"prefill_s": 0.11, "decode_tokens_per_s": 96.0}
    assert timing.noise_floor(base1, base2) == pytest.approx(0.1)


def test_a_model_whose_rounds_disagree_widens_the_noise_floor():
    """The case seen on SmolLM2 (compare --quick): one quiet base pair set a 9% floor while the
    merged model's decode rounds disagreed, and its median read as a 41% slowdown."""
    base1 = {"prefill_s": 0.40, "decode_tokens_per_s": 53.0, "rounds": [[0.40, 53.5], [0.41, 52.5]]}
    base2 = {"prefill_s": 0.43, "decode_tokens_per_s": 53.4, "rounds": [[0.43, 53.4], [0.43, 53.4]]}
    merged = {
        "prefill_s": 0.45,
        "decode_tokens_per_s": 37.8,
        "rounds": [[0.45, 30.0], [0.45, 45.6]],
    }
    assert timing.noise_floor(base1, base2) == pytest.approx(0.075)  # the phases alone
    floor = timing.noise_floor(base1, base2, merged)
    assert floor == pytest.approx(45.6 / 30.0 - 1)
    ratios = {"prefill_latency_ratio": 0.45 / 0.43, "decode_speed_ratio": 37.8 / 53.4}
    assert timing.findings(None, ratios, 0.075, False)["merged"]["finding"] == "slower"
    assert timing.findings(None, ratios, floor, False)["merged"]["finding"] == "within noise"
    steady = {**merged, "rounds": [[0.45, 37.7], [0.45, 37.9]]}  # a real slowdown stays one
    floor = timing.noise_floor(base1, base2, steady)
    assert timing.findings(None, ratios, floor, False)["merged"]["finding"] == "slower"
