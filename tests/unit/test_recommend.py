"""``peftlab recommend``: the document's own example, bad input, JSON output, measured results."""

from __future__ import annotations

import json

import pytest

import peftlab
from peftlab.cli import main
from peftlab.core.config import ConfigError


def test_documents_example_13b_on_24gb_recommends_a_method_that_fits():
    """The user's document answers LoRA for 13B on 24 GB; 16-bit weights alone are ~26 GB."""
    recs = peftlab.recommend(
        "llama-2-13b", 24, task="generation", latency_critical=True, quality="high"
    )
    best = recs[0]
    assert best.method == "qlora" and best.fits and best.peak_memory_gb <= 24
    assert best.config["method_args"]["r"] > 0
    lora = next(r for r in recs if r.method == "lora")
    assert not lora.fits
    assert "26.0 GB" in lora.reason and "weights alone" in lora.reason
    assert {r.method for r in recs} == set(peftlab.methods())


def test_more_memory_lets_16_bit_lora_fit_and_latency_prefers_mergeable():
    recs = peftlab.recommend(
        "llama-2-7b", 80, task="generation", latency_critical=True, quality="high"
    )
    fitting = [r.method for r in recs if r.fits]
    assert "lora" in fitting and "full" not in fitting  # 7B full fine-tuning needs > 100 GB
    assert recs[0].method in ("lora", "dora", "qlora")


def test_small_model_on_cpu_budget():
    recs = peftlab.recommend(
        "smollm2-135m", 8, task="classification", dtype="float32", device="cpu", seq_len=128
    )
    assert all(r.fits for r in recs)
    for r in recs:
        assert r.peak_memory_gb <= 8 * 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"memory_gb": -4}, "memory_gb"),
        ({"memory_gb": 0}, "memory_gb"),
        ({"task": "translation"}, "task"),
        ({"quality": "best"}, "quality"),
        ({"model": "llama-9-99b"}, "Known presets: .*llama-2-13b"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"model": "llama-2-7b", "memory_gb": 24, **kwargs}
    with pytest.raises(ConfigError, match=match):
        peftlab.recommend(**args)


def test_cli_json(capsys):
    rc = main(
        [
            "recommend",
            "--model",
            "llama-2-13b",
            "--memory-gb",
            "24",
            "--quality",
            "high",
            "--latency-critical",
            "--json",
        ]
    )
    assert rc == 0
    recs = json.loads(capsys.readouterr().out)["recommendations"]
    assert recs[0]["method"] == "qlora" and recs[0]["fits"] is True
    for r in recs:
        assert {"method", "fits", "peak_memory_gb", "reason", "config"} <= set(r)


def test_cli_errors_are_clear(capsys):
    assert main(["recommend", "--model", "nope-1b", "--memory-gb", "24"]) == 2
    assert "Known presets" in capsys.readouterr().err
    assert main(["recommend", "--model", "llama-2-7b", "--memory-gb", "-1"]) == 2
    assert "memory_gb" in capsys.readouterr().err
    assert main(["recommend", "--model", "llama-2-7b", "--memory-gb", "24", "--task", "chat"]) == 2
    assert "task" in capsys.readouterr().err


def test_cli_estimate(capsys):
    assert (
        main(
            [
                "estimate",
                "--model",
                "llama-2-7b",
                "--method",
                '{"method": "lora", "r": 16}',
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lora" and out["peak"] > out["weights"] > 13e9


def _result(tmp_path, method, tokens_per_s, acc, ratio):
    (tmp_path / f"{method}.json").write_text(
        json.dumps(
            {
                "run_info": {"method": method},
                "train_info": {
                    "status": "ok",
                    "tokens_per_s": tokens_per_s,
                    "eval": {"eval_accuracy": acc},
                    "inference": {"unmerged_vs_base": {"prefill_latency_ratio": ratio}},
                },
                "meta_info": {},
            }
        )
    )


def test_measured_results_replace_priors(tmp_path):
    _result(tmp_path, "lora", 100.0, 0.80, 1.2)
    _result(tmp_path, "prompt", 200.0, 0.90, 1.0)
    recs = {
        r.method: r
        for r in peftlab.recommend(
            "smollm2-135m",
            8,
            task="classification",
            results=tmp_path,
            dtype="float32",
            device="cpu",
            seq_len=128,
        )
    }
    assert recs["prompt"].source == "measured" and recs["prompt"].speed == 1.0
    assert recs["lora"].speed == 0.5 and recs["lora"].quality == pytest.approx(0.8 / 0.9, rel=1e-3)
    assert recs["dora"].source == "priors"
    with pytest.raises(ConfigError, match="is not a directory"):
        peftlab.recommend("smollm2-135m", 8, results=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no peftlab compare result"):
        peftlab.recommend("smollm2-135m", 8, results=tmp_path / "empty")


def test_priors_come_from_the_select_table(monkeypatch):
    """The recommender's priors are the MODELS rows (not the methods' registrations)."""
    import dataclasses

    from peftlab.select.models import MODELS

    row = MODELS["lora"]
    quality = {**row.profile.quality, "generation": 0.123}
    profile = dataclasses.replace(row.profile, quality=quality, inference="test overhead")
    monkeypatch.setitem(MODELS, "lora", dataclasses.replace(row, profile=profile))
    lora = next(r for r in peftlab.recommend("smollm2-135m", 8) if r.method == "lora")
    assert lora.quality == 0.123 and lora.inference_overhead == "test overhead"


def test_every_optimizer_the_trainer_builds_can_be_planned_for():
    from peftlab.train.optim import OPTIMIZERS

    for name in OPTIMIZERS:
        recs = peftlab.recommend("smollm2-135m", 8, optimizer=name, seq_len=128)
        assert recs and all(r.config["optimizer"] == name for r in recs)
    paged = peftlab.recommend("llama-2-13b", 24, optimizer="paged_adamw_8bit")
    eight = peftlab.recommend("llama-2-13b", 24, optimizer="adamw_8bit")
    assert [(r.method, r.peak_memory_gb) for r in paged] == [
        (r.method, r.peak_memory_gb) for r in eight
    ]
    with pytest.raises(ConfigError, match="optimizer='sgd' is invalid"):
        peftlab.recommend("llama-2-7b", 24, optimizer="sgd")


def test_a_classification_model_plans_its_new_head_for_every_method():
    """Every method trains a classification model's new head (modules_to_save=None), so every
    plan's trainable count includes the classifier."""
    from peftlab.select.estimator import estimate_memory
    from peftlab.select.presets import PRESETS

    arch = PRESETS["minilm-l6"]
    for r in peftlab.recommend("minilm-l6", 4, task="classification", seq_len=128):
        settings = {"method": r.method, **r.config["method_args"]}
        with_head = estimate_memory(arch, settings, 1, 128).trainable_params
        without = estimate_memory(arch, {**settings, "modules_to_save": []}, 1, 128)
        expected = 0 if r.method == "full" else arch.classifier_params()
        assert with_head - without.trainable_params == expected, r.method


def _lora(budget, **kwargs):
    args = {"seq_len": 2048, "batch_size": 1, "dtype": "float32", **kwargs}
    return next(r for r in peftlab.recommend("smollm2-135m", budget, **args) if r.method == "lora")


def test_a_plan_names_the_chunked_loss_and_the_checkpointing_it_needs():
    """SmolLM2, LoRA, 1 × 2048 tokens, fp32: the ladder walks checkpointing none → every 4th →
    every 2nd → every layer with the chunked loss, and the reason names what the plan needed."""
    r = _lora(2.5)
    assert r.fits and r.reason.startswith(
        "fits at 2.1 of 2.5 GB with chunked loss and checkpointing every 2nd layer (r=16, "
    )
    assert r.config["gradient_checkpointing"] == {"every": 2} and r.config["chunked_loss"]
    assert r.speed == pytest.approx(3 / 3.5, abs=1e-3)  # 15 of 30 layers run forward twice
    # Without the chunked loss the same budget needs every layer checkpointed.
    plain = _lora(2.5, chunked_loss=False)
    assert plain.config["gradient_checkpointing"] is True and not plain.config["chunked_loss"]
    assert "with checkpointing every layer" in plain.reason and "chunked" not in plain.reason
    assert plain.speed == pytest.approx(0.75)
    # More memory: the chunked loss alone, then nothing worth naming (the plain loss fits too).
    alone = _lora(4)
    assert alone.config["gradient_checkpointing"] is False
    assert " with chunked loss (" in alone.reason
    roomy = _lora(6)
    assert roomy.reason.startswith("fits at 3.3 of 6 GB (r=16")
    assert roomy.config["chunked_loss"]  # the trainer's default stays on


def test_a_plan_that_does_not_fit_says_what_it_tried():
    r = _lora(1.0)
    assert not r.fits
    assert "at batch 1 with chunked loss and checkpointing every layer (" in r.reason


def test_classification_plans_have_no_chunked_loss():
    for r in peftlab.recommend("minilm-l6", 4, task="classification", seq_len=128):
        assert "chunked_loss" not in r.config and "chunked" not in r.reason
