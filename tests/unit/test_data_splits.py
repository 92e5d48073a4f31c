"""Train / validation / test splits: carved from the data (a pure function of seed and data)
or read from validation_data / eval_data; the test split is scored once, after training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.data import DataError, load_task_data
from peftlab.train import train
from tests.tiny_lm import char_tokenizer, save_tiny_lm


@pytest.fixture
def tok():
    return char_tokenizer()


def _csv(path: Path, n: int, start: int = 0) -> str:
    rows = ["text,label"] + [f"example {i},{i % 2}" for i in range(start, start + n)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _texts(tok, split) -> set[str]:
    return {tok.decode(e["input_ids"]) for e in split}


def test_carved_splits_are_disjoint_sized_and_a_function_of_the_seed(tmp_path, tok):
    data = _csv(tmp_path / "d.csv", 40)
    d = load_task_data(tok, data, "classification", 64, eval_size=6, seed=3, test_size=5)
    assert (len(d.train), len(d.validation), len(d.test)) == (29, 6, 5)
    train, val, test = _texts(tok, d.train), _texts(tok, d.validation), _texts(tok, d.test)
    assert len(train | val | test) == 40  # disjoint, and every example is somewhere
    again = load_task_data(tok, data, "classification", 64, eval_size=6, seed=3, test_size=5)
    assert [e["input_ids"] for e in again.test] == [e["input_ids"] for e in d.test]
    other = load_task_data(tok, data, "classification", 64, eval_size=6, seed=4, test_size=5)
    assert _texts(tok, other.test) != test
    # without test_size the validation split is the one a run without a test split had
    plain = load_task_data(tok, data, "classification", 64, eval_size=6, seed=3)
    assert plain.validation == d.validation and plain.test == [] and len(plain.train) == 34
    assert d.counts["test"] == {"read": 5, "truncated": 0, "dropped": 0, "kept": 5}


def test_eval_data_is_the_test_set_and_validation_is_carved(tmp_path, tok):
    data = _csv(tmp_path / "d.csv", 20)
    test_file = _csv(tmp_path / "t.csv", 7, start=100)
    d = load_task_data(tok, data, "classification", 64, eval_size=4, eval_data=test_file)
    assert (len(d.train), len(d.validation), len(d.test)) == (16, 4, 7)
    assert all("example 1" in t for t in _texts(tok, d.test))  # 100..106: the file's rows
    assert not _texts(tok, d.test) & _texts(tok, d.train + d.validation)
    first = load_task_data(tok, data, "classification", 64, 4, test_file, test_size=3)
    assert first.test == d.test[:3]
    with pytest.raises(
        DataError, match=r"test_size=9 is invalid: eval_data='.*t\.csv' holds 7 examples"
    ):
        load_task_data(tok, data, "classification", 64, 4, test_file, test_size=9)
    with pytest.raises(
        DataError, match=r"holding out eval_size=4 and test_size=16 of 20; eval_size \+ test_size"
    ):
        load_task_data(tok, data, "classification", 64, 4, test_size=16)


def test_builtin_validation_and_test_do_not_repeat_training_examples(tok):
    d = load_task_data(
        tok,
        "builtin:sort",
        "causal-lm",
        200,
        eval_size=8,
        data_size=50,
        validation_data="builtin:sort",
        eval_data="builtin:sort",
        test_size=8,
    )
    train, val, test = _texts(tok, d.train), _texts(tok, d.validation), _texts(tok, d.test)
    assert len(d.train) == 50 and len(val) == len(test) == 8
    assert not (train & val) and not (train & test) and not (val & test)
    assert all(e["answer"] and e["prompt_ids"] for e in d.test)


def test_a_run_scores_the_test_split_once_at_the_end(tmp_path):
    tiny = str(save_tiny_lm(tmp_path / "lm"))
    out = tmp_path / "run"
    summary = train(
        {
            "model": tiny,
            "method_args": {"r": 4, "target_modules": "all-linear"},
            "data": "builtin:sort",
            "data_size": 32,
            "eval_size": 4,
            "test_size": 6,
            "eval_every": 2,
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "eval_exact_match": True,
            "progress": False,
            "output_dir": str(out),
        }
    )
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    tests = [m for m in lines if any(k.startswith("test_") for k in m)]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4] and len(tests) == 1
    assert set(tests[0]) == {"step", "test_loss", "test_ppl", "test_exact_match"}
    assert tests[0]["step"] == 4 and not any(k.startswith("eval_") for k in tests[0])
    assert summary["test"] == {k: v for k, v in tests[0].items() if k != "step"}
    assert summary["test_examples"] == 6 and summary["validation_examples"] == 4
    assert json.loads((out / "summary.json").read_text())["test"] == summary["test"]
    # a test loss differs from the validation loss: another set of examples was scored
    assert summary["test"]["test_loss"] != summary["eval_after"]["eval_loss"]


def test_a_search_trial_neither_scores_nor_pays_for_the_test_split(tmp_path):
    """``eval_test: false`` (compare's search trials): no test_ line, summary test None."""
    tiny = str(save_tiny_lm(tmp_path / "lm"))
    out = tmp_path / "run"
    summary = train(
        {
            "model": tiny,
            "method_args": {"r": 4},
            "data": "builtin:sort",
            "data_size": 16,
            "eval_size": 4,
            "test_size": 6,
            "eval_before": False,
            "eval_test": False,
            "max_steps": 2,
            "batch_size": 4,
            "progress": False,
            "output_dir": str(out),
        }
    )
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("test_") for m in lines for k in m)
    assert [m["step"] for m in lines if "eval_loss" in m] == [2]
    assert summary["test"] is None and summary["eval_after"]["eval_loss"] > 0
