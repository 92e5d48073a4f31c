"""Adapters written by peft itself load here as peft loads them: sequence-classification
adapters (peft adds ``modules_to_save=["classifier", "score"]`` to every one), IA³ files, and
a written-out "all-linear" that names the head ``modules_to_save`` also names."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftlab
from peftlab import AdapterFileError
from tests.conftest import tiny_bert, tiny_llama

peft = pytest.importorskip("peft")


def _llama_classifier(seed=0):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama().config
    config.num_labels, config.pad_token_id = 3, 0
    return LlamaForSequenceClassification(config).eval()


def _perturbed_peft(base, config):
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


CASES = {
    "lora-bert": (
        tiny_bert,
        lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    ),  # fmt: skip
    "lora-all-linear-bert": (
        tiny_bert,
        lambda: peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"),
    ),  # fmt: skip
    "lora-llama-score": (
        _llama_classifier,
        lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
    ),  # fmt: skip
    "ia3-bert": (tiny_bert, lambda: peft.IA3Config(task_type="SEQ_CLS")),
    "ia3-llama-causal": (tiny_llama, lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "loha-bert": (
        tiny_bert,
        lambda: peft.LoHaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_files_load_with_peft_logits(case, batch, tmp_path):
    make, config = CASES[case]
    base = make()
    theirs = _perturbed_peft(base, config())
    theirs.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    if doc.get("task_type") == "SEQ_CLS":
        assert sorted(doc["modules_to_save"]) == ["classifier", "score"]  # what peft writes
    ours = peftlab.load_adapter(make(), tmp_path)
    torch.testing.assert_close(_logits(ours, batch), _logits(theirs, batch), rtol=0, atol=1e-5)
    head = "score" if case == "lora-llama-score" else "classifier"
    if doc.get("task_type") == "SEQ_CLS":  # the trained head came in, and trains on
        assert getattr(ours, head).weight.requires_grad
        assert not torch.equal(getattr(ours, head).weight, getattr(make(), head).weight)


def test_a_peft_file_whose_module_list_names_nothing_here_is_still_refused(batch, tmp_path):
    theirs = _perturbed_peft(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query"]))
    theirs.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    doc["target_modules"] = ["nowhere"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    model = tiny_bert()
    with pytest.raises((AdapterFileError, peftlab.ConfigError), match="nowhere"):
        peftlab.load_adapter(model, tmp_path)
    assert not any(type(m).__module__.startswith("peftlab") for m in model.modules())
