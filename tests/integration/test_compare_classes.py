"""``peftlab compare`` on classification files with more than two classes (#17 defect 14) and
``--tune`` (#15) end to end on a tiny BERT encoder: real worker processes, real searches."""

from __future__ import annotations

import json

import pytest

import peftlab
from peftlab.results import quality
from tests.tiny_classifier import save_tiny_bert, write_classes


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert"))


@pytest.mark.parametrize("classes, test_size", [(3, None), (5, 10)])
def test_compare_sizes_the_head_from_the_data(bert, tmp_path, classes, test_size):
    data = write_classes(tmp_path / f"c{classes}.csv", classes)
    overrides = {"test_size": test_size} if test_size else {}
    res = peftlab.compare(
        ["lora"], model=bert, data=str(data), steps=2, quick=True, out=tmp_path / "out",
        train_overrides=overrides, echo=False,
    )  # fmt: skip
    (r,) = res["results"]
    ti = r["train_info"]
    # Before: IndexError: Target 2 is out of bounds (the worker's model had two labels).
    assert ti["status"] == "ok", ti.get("error")
    assert r["run_info"]["num_labels"] == classes
    # The headline quality and the baselines are on the test split when there is one.
    split = "test" if test_size else "validation"
    assert quality(r).split == split and (ti.get("test") is not None) == bool(test_size)
    base = ti["baselines"]
    assert base["split"] == split and base["examples"] == (test_size or 8)
    assert 0 <= base["majority"]["class"] < classes and "accuracy" in base["base_model"]
    assert set(ti["eval"]) == {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_mcc"}
    assert {"reliable", "why", "noise_floor", "findings"} <= set(ti["timing"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "beats the majority class" in md and f"{split} accuracy" in md


def test_tune_picks_a_setting_per_method_and_a_failing_method_leaves_the_rest(bert, tmp_path):
    data = write_classes(tmp_path / "c3.csv", 3)
    res = peftlab.compare(
        ["lora", "prompt"],
        model=bert,
        data=str(data),
        steps=4,
        quick=True,
        tune=("lr",),
        # Every lora candidate fails in apply: lora fails with that error, prompt goes on.
        method_args={"lora": {"target_modules": ["no_such_module"]}},
        out=tmp_path / "out",
        echo=False,
    )
    lora, prompt = res["results"]
    assert lora["train_info"]["status"] == "failed"
    assert "tuning failed" in lora["train_info"]["error"]
    assert "no_such_module" in lora["train_info"]["error"]
    t = prompt["train_info"]["tuning"]
    assert prompt["train_info"]["status"] == "ok" and t["keys"] == ["lr"]
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    trials = t["search"]["trials"]
    past = [tr for tr in trials if tr["beyond_grid"]]  # an edge winner tries past the edge
    assert t["chosen"]["lr"] in grid + [tr["candidate"]["lr"] for tr in past]
    assert prompt["run_info"]["lr"] == t["chosen"]["lr"]
    # Successive halving: 4 candidates for 2 steps, the better 2 for 2 more (budget 4).
    rungs = [(0, 2)] * 4 + [(1, 2)] * (2 + len(past))
    assert [(tr["rung"], tr["steps"]) for tr in trials] == rungs and len(past) <= 2
    assert sorted(tr["candidate"]["lr"] for tr in trials[:4]) == grid
    assert all(tr["score"] is not None for tr in trials) and sum(tr["kept"] for tr in trials) == 3
    saved = json.loads((tmp_path / "out" / "prompt.json").read_text())
    assert saved["train_info"]["tuning"]["search"] == t["search"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Tuning: each method's own search" in md and "chose lr=" in md
    assert "tuning failed" in md.split("## Failed runs")[1]
