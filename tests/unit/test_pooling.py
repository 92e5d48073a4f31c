"""Pooling for classification heads: a sentence-embedding checkpoint is read as its masked mean
(as it was trained), the [CLS] pooler otherwise; the choice is saved with the model and every
wrong value is a one-line error (peftlab/pooling.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.models import load_model
from peftlab.pooling import MeanPooler, PoolingError, apply_pooling, declared_pooling
from tests.tiny_classifier import save_tiny_bert


def _sentence_transformers(path, mean=True):
    """Mark a saved encoder as a sentence-transformers model (modules.json + Pooling config)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pool = {"pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    return path


@pytest.fixture
def st_dir(tmp_path):
    return _sentence_transformers(save_tiny_bert(tmp_path / "st"))


def _batch():
    ids = torch.tensor([[2, 5, 6, 7, 8, 3], [2, 9, 10, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_a_sentence_transformers_model_is_read_as_its_masked_mean(st_dir):
    model = load_model(str(st_dir), "classification").eval()
    assert isinstance(model.bert.pooler, MeanPooler) and model.config.peftlab_pooling == "mean"
    ids, mask = _batch()
    out = model.bert(input_ids=ids, attention_mask=mask)
    m = mask.unsqueeze(-1).float()
    want = (out.last_hidden_state * m).sum(1) / m.sum(1)
    torch.testing.assert_close(out.pooler_output, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("copied", [False, True])
def test_padding_does_not_change_a_rows_logits_under_mean_pooling(st_dir, copied):
    model = load_model(str(st_dir), "classification").eval()
    if copied:  # compare's search trains deep copies of one loaded model
        original, model = model, copy.deepcopy(model)
        original(input_ids=_batch()[0][:1, :2], attention_mask=_batch()[1][:1, :2])
    ids, mask = _batch()
    with torch.no_grad():
        short = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
        padded = model(input_ids=ids, attention_mask=mask).logits[1:]
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_cls_is_kept_for_plain_checkpoints_and_on_request(tmp_path, st_dir):
    plain = load_model(str(save_tiny_bert(tmp_path / "plain")), "classification")
    assert not isinstance(plain.bert.pooler, MeanPooler)
    forced = load_model(str(st_dir), "classification", pooling="cls")
    assert not isinstance(forced.bert.pooler, MeanPooler)
    cls_st = _sentence_transformers(save_tiny_bert(tmp_path / "cls-st"), mean=False)
    assert declared_pooling(cls_st, plain.config) == "cls"
    asked = load_model(str(tmp_path / "plain"), "classification", pooling="mean")
    assert isinstance(asked.bert.pooler, MeanPooler)


def test_state_dict_keys_are_those_of_the_cls_model(st_dir):
    mean = load_model(str(st_dir), "classification")
    cls = load_model(str(st_dir), "classification", pooling="cls")
    assert list(mean.state_dict()) == list(cls.state_dict())


def test_the_choice_is_saved_with_the_model(st_dir, tmp_path):
    model = load_model(str(st_dir), "classification")
    model.save_pretrained(tmp_path / "saved")  # no modules.json there
    again = load_model(str(tmp_path / "saved"), "classification")
    assert isinstance(again.bert.pooler, MeanPooler)
    ids, mask = _batch()
    with torch.no_grad():
        a = model.eval()(input_ids=ids, attention_mask=mask).logits
        b = again.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_methods_train_on_a_mean_pooled_model(st_dir, method):
    model = load_model(str(st_dir), "classification")
    args = {"num_virtual_tokens": 3} if method != "lora" else {"r": 2}
    peftlab.apply(model, peftlab.config_from_dict({"method": method, **args}))
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2)
    out.loss.backward()
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head and all(p.grad is not None for p in head)


def test_prompt_tuning_pools_over_the_real_tokens(st_dir):
    """The virtual tokens are stripped before pooling: the pooled vector is the mean of the
    real tokens' states."""
    model = load_model(str(st_dir), "classification").eval()
    peftlab.apply(model, peftlab.PromptTuningConfig(num_virtual_tokens=3))
    ids, mask = _batch()
    out = model.bert(input_ids=ids, attention_mask=mask)
    m = mask.unsqueeze(-1).float()
    want = (out.last_hidden_state * m).sum(1) / m.sum(1)
    torch.testing.assert_close(out.pooler_output, want, atol=1e-6, rtol=1e-6)


def test_bad_pooling_values_are_one_line_errors(st_dir, tmp_path):
    model = load_model(str(st_dir), "classification", pooling="cls")
    with pytest.raises(PoolingError, match=r"pooling: 'max' is not a pooling; use one of auto"):
        apply_pooling(model, "max")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=4)
    other = DistilBertForSequenceClassification(cfg)
    with pytest.raises(PoolingError, match=r"'distilbert' reads the first token.*pooling: cls"):
        apply_pooling(other, "mean")
    assert apply_pooling(other, "auto") == "cls"
    from peftlab.train.config import TrainConfig

    with pytest.raises(ConfigError, match="pooling"):
        TrainConfig(pooling="max")
