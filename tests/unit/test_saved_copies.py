"""Modules trained in full (a classifier head) with several adapters: each adapter has its own
copy (peftlab/core/saved.py), so a second adapter never overwrites the first one's head."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from tests.conftest import tiny_bert

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(model, name, seed):
    """Stand-in for training adapter ``name``: new values in its LoRA factors and the head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert f".{name}." in n or n.startswith("classifier."), n
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _two_adapters():
    model = tiny_bert()
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    cfg = peftlab.LoRAConfig(r=4, target_modules=["query", "value"])
    peftlab.apply(model, cfg, "a")
    _train(model, "a", 0)
    want_a = _logits(model)
    peftlab.apply(model, cfg, "b")
    return model, head, want_a


def test_a_second_adapter_gets_its_own_head_from_the_base_values(tmp_path):
    model, head, want_a = _two_adapters()
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head[k])  # b starts from the base's head, not a's
    _train(model, "b", 1)
    want_b = _logits(model)
    peftlab.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), want_a, rtol=0, atol=0)
    peftlab.set_adapter(model, "b")
    torch.testing.assert_close(_logits(model), want_b, rtol=0, atol=0)
    # Each file holds its adapter's own head, whichever is active; they reload as trained.
    for name in ("a", "b"):
        peftlab.save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = tiny_bert()
    peftlab.load_adapter(fresh, tmp_path / "a", "a")
    peftlab.load_adapter(fresh, tmp_path / "b", "b")
    torch.testing.assert_close(_logits(fresh), want_b, rtol=0, atol=0)
    peftlab.set_adapter(fresh, "a")
    torch.testing.assert_close(_logits(fresh), want_a, rtol=0, atol=0)


def test_switching_keeps_each_adapters_parameters_the_same_objects():
    model, _, _ = _two_adapters()
    b_head = model.classifier.weight
    peftlab.set_adapter(model, "a")
    a_head = model.classifier.weight
    assert a_head is not b_head and a_head.requires_grad
    peftlab.set_adapter(model, "b")
    assert model.classifier.weight is b_head  # an optimizer built for b still holds it
    assert not a_head.requires_grad or a_head is not model.classifier.weight


def test_two_adapters_training_the_head_cannot_be_active_together():
    model, _, _ = _two_adapters()
    before = _logits(model)
    with pytest.raises(ConfigError, match="each train their own copy of 'classifier'"):
        peftlab.set_adapter(model, ["a", "b"])
    assert peftlab.active_adapters(model) == ("b",)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_an_adapter_without_the_head_computes_with_the_base_head():
    model, head, _ = _two_adapters()
    peftlab.apply(
        model, peftlab.LoRAConfig(r=4, target_modules=["key"], modules_to_save=[]), "plain"
    )
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head[k])
    assert not any(p.requires_grad for p in model.classifier.parameters())


def test_deleting_the_holder_gives_the_module_to_the_next_adapter(tmp_path):
    model, head, want_a = _two_adapters()
    peftlab.set_adapter(model, "a")
    peftlab.delete_adapter(model, "a")
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head[k])  # nothing active trains it: the base's values
    peftlab.set_adapter(model, "b")
    assert model.classifier.weight.requires_grad
    plain = peftlab.unload(model)
    for k, v in plain.classifier.state_dict().items():
        assert torch.equal(v, head[k])


def test_a_refused_load_leaves_the_first_adapters_head(tmp_path):
    model, _, want_a = _two_adapters()
    peftlab.delete_adapter(model, "b")
    peftlab.set_adapter(model, "a")
    other = tiny_bert()
    peftlab.apply(other, peftlab.LoRAConfig(r=8, target_modules=["query", "value"]))
    peftlab.save_adapter(other, tmp_path / "r8")
    with open(tmp_path / "r8" / "adapter_config.json") as f:
        text = f.read().replace('"r": 8', '"r": 4')
    with open(tmp_path / "r8" / "adapter_config.json", "w") as f:
        f.write(text)  # the file's tensors no longer fit its config: refused after attaching
    with pytest.raises(peftlab.AdapterFileError, match="shape mismatches"):
        peftlab.load_adapter(model, tmp_path / "r8", "c")
    torch.testing.assert_close(_logits(model), want_a, rtol=0, atol=0)
    assert peftlab.active_adapters(model) == ("a",)


def test_switching_or_adding_inside_disable_adapters_is_refused(tmp_path):
    """Inside the block the head holds the base's values; a switch there would hand them (and
    then the block's restore) to the wrong adapter."""
    model, _, want_a = _two_adapters()
    _train(model, "b", 1)
    want_b = _logits(model)
    with peftlab.disable_adapters(model):
        with pytest.raises(ConfigError, match="inside `with peftlab.disable_adapters"):
            peftlab.set_adapter(model, "a")
        with pytest.raises(ConfigError, match="inside `with peftlab.disable_adapters"):
            peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["key"]), "c")
    torch.testing.assert_close(_logits(model), want_b, rtol=0, atol=0)
    peftlab.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), want_a, rtol=0, atol=0)


def test_a_module_inside_another_adapters_module_is_refused():
    model = tiny_bert()
    peftlab.apply(model, peftlab.LoRAConfig(r=4, modules_to_save=["bert.pooler"]), "a")
    before = _logits(model)
    with pytest.raises(ConfigError, match="'bert.pooler.dense' overlaps 'bert.pooler'"):
        peftlab.apply(model, peftlab.LoRAConfig(r=4, modules_to_save=["pooler.dense"]), "b")
    assert sorted(peftlab.core.state.adapter_configs(model)) == ["a"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
