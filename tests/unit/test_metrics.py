"""Task metrics: confusion-matrix metrics against hand-computed values, answer extraction,
user metrics that fail cleanly."""

from __future__ import annotations

import math
import sys
import types

import pytest

from peftlab.train import metrics as M


def test_binary_metrics_match_hand_computation():
    # TP=3 FN=1 FP=2 TN=4 (positive class 1)
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    c = M.confusion(preds, labels, 2)
    assert c == [[4, 2], [1, 3]]
    out = M.classification_metrics(c)
    assert out["accuracy"] == pytest.approx(0.7)
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 2 + 1), 2 * 4 / (2 * 4 + 1 + 2)
    assert out["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    phi = (3 * 4 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (4 + 2) * (4 + 1))
    assert out["mcc"] == pytest.approx(phi)


def test_multiclass_and_degenerate_cases():
    c = M.confusion([0, 1, 2, 2], [0, 1, 2, 1], 3)
    out = M.classification_metrics(c)
    assert out["accuracy"] == pytest.approx(0.75)
    assert -1 <= out["mcc"] <= 1 and out["mcc"] > 0
    constant = M.classification_metrics(M.confusion([0] * 5, [0, 1, 0, 1, 2], 3))
    assert constant["mcc"] == 0.0  # always one answer: no correlation
    perfect = M.classification_metrics(M.confusion([0, 1, 2], [0, 1, 2], 3))
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": pytest.approx(1.0)}


def test_majority_baseline():
    base = M.majority_baseline([0, 1, 1, 1], 2, train_labels=[1, 1, 0])
    assert base["class"] == 1 and base["accuracy"] == 0.75 and base["mcc"] == 0.0


@pytest.mark.parametrize(
    "text, spec, want",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "####", "72"),
        ("no marker", "####", None),
        ("so 1,234.0 apples, then 12", "last-number", "12"),
        ("total: 1,000", "last-number", "1000"),
        ("3.50", "last-number", "3.5"),
        ("The answer is (B).", "regex:\\(([A-D])\\)", "B"),
        ("  a   b ", "exact", "a b"),
    ],
)
def test_extract(text, spec, want):
    assert M.extract(text, spec) == want


def test_exact_match_hits_and_bad_extractors():
    assert M.exact_match_hits(["#### 72", "it is 5"], ["blah #### 72", "#### 6"], "####") == 1
    assert M.exact_match_hits(["x 4.0", "7"], ["4", "8"], "last-number") == 1
    with pytest.raises(M.MetricError, match="answer_extractor"):
        M.check_extractor("first-word")
    with pytest.raises(M.MetricError, match="does not compile"):
        M.check_extractor("regex:(")


def test_user_metric_is_checked(monkeypatch):
    mod = types.ModuleType("peftlab_test_usermetric")
    mod.good = lambda p, r: sum(a == b for a, b in zip(p, r)) / len(r)
    mod.boom = lambda p, r: 1 / 0
    mod.text = lambda p, r: "high"
    mod.nan = lambda p, r: float("nan")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    assert M.call_user_metric(f"{mod.__name__}:good", ["a", "b"], ["a", "c"]) == 0.5
    for name, match in [("boom", "raised ZeroDivisionError"), ("text", "finite number"),
                        ("nan", "finite number"), ("missing", "cannot load")]:  # fmt: skip
        with pytest.raises(M.MetricError, match=match):
            M.call_user_metric(f"{mod.__name__}:{name}", ["a"], ["a"])
    with pytest.raises(M.MetricError, match="module:function"):
        M.load_user_metric("no-colon")


def test_classification_eval_takes_loss_and_predictions_from_one_forward_pass():
    """evaluate() scores classification with one forward per batch; its loss and confusion
    matrix equal a separate per-example computation (uneven last batch, padding)."""
    import torch
    import torch.nn.functional as F

    from peftlab.data.encode import TaskData
    from peftlab.train.evaluate import evaluate
    from tests.conftest import tiny_bert
    from tests.tiny_lm import char_tokenizer

    tok, model = char_tokenizer(), tiny_bert().eval()
    texts = ["good", "bad film", "a long and dull movie", "fine", "ok then", "no"]
    examples = [{"input_ids": tok(t)["input_ids"], "label": i % 2} for i, t in enumerate(texts)]
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    data = TaskData("classification", [], examples, [], ["0", "1"])
    out = evaluate(model, tok, data, batch_size=4)
    assert len(calls) == 2  # 6 examples in batches of 4: one pass each
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    labels = torch.tensor([e["label"] for e in examples])
    loss = F.cross_entropy(torch.stack(logits), labels).item()
    preds = [int(x.argmax()) for x in logits]
    assert out["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert out["eval_accuracy"] == pytest.approx(
        sum(p == y for p, y in zip(preds, labels.tolist())) / 6
    )


# ---- wired into training and compare ---------------------------------------------------------

METRIC_MODULE = """
def nonempty(preds, refs):
    return sum(bool(p.strip()) for p in preds) / len(preds)

def boom(preds, refs):
    raise RuntimeError("the scorer is broken")
"""


@pytest.fixture
def metric_dir(tmp_path, monkeypatch):
    """A user's metrics file in the current directory, as a user keeps it beside the data."""
    name = f"usermetrics_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(METRIC_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"answer_extractor": "first-word"}, "answer_extractor='first-word' is invalid"),
        ({"answer_extractor": "regex:("}, "does not compile"),
        ({"metric": "no_such_module_xyz:f1"}, "cannot load it"),
        ({"metric": "f1"}, "give 'module:function'"),
    ],
)
def test_bad_extractor_or_metric_is_refused_before_training(tmp_path, keys, match):
    from peftlab.core.config import ConfigError
    from peftlab.train.config import TrainConfig
    from tests.tiny_lm import tiny_run_config

    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(tiny_run_config("m", tmp_path / "run", **keys))


def test_a_user_metric_is_scored_and_becomes_the_quality(tmp_path, metric_dir):
    from peftlab.results import quality_of
    from peftlab.train import train
    from tests.tiny_lm import save_tiny_lm, tiny_run_config

    model = str(save_tiny_lm(tmp_path / "model"))
    cfg = tiny_run_config(model, tmp_path / "run", metric=f"{metric_dir}:nonempty",
                          answer_extractor="last-number", eval_size=8, test_size=8)  # fmt: skip
    summary = train(cfg)
    for split, prefix in ((summary["eval_after"], "eval"), (summary["test"], "test")):
        assert 0.0 <= split[f"{prefix}_metric"] <= 1.0 and f"{prefix}_exact_match" in split
        assert quality_of(split, prefix).name == "metric"


def test_a_raising_metric_is_one_line_and_names_the_metric(tmp_path, metric_dir, capsys):
    import yaml

    from peftlab.cli import main
    from tests.tiny_lm import save_tiny_lm, tiny_run_config

    model = str(save_tiny_lm(tmp_path / "model"))
    cfg = tiny_run_config(model, tmp_path / "run", metric=f"{metric_dir}:boom", eval_size=4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()  # above it: the model loader's progress bars
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"peftlab train: error: metric='{metric_dir}:boom' raised "
                                    "RuntimeError: the scorer is broken")  # fmt: skip
    # It failed at the step-0 evaluation: the new run left no files, so a rerun may start there.
    run = tmp_path / "run"
    assert not run.exists() or [p.name for p in run.iterdir() if not p.name.startswith(".")] == []
