"""Adapters of different methods on one model: each on layers of its own, activated alone or
together, saved and deleted by name — checked against models that hold one adapter only."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.state import adapter_configs
from tests.conftest import tiny_bert, tiny_llama

# One layer method per projection of the tiny Llama, plus the three virtual-token methods.
LAYER_ADAPTERS = {
    "lo": peftlab.LoRAConfig(r=4, target_modules=["q_proj"]),
    "ia": peftlab.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
    "bn": peftlab.AdapterConfig(bottleneck=8, target_modules=["o_proj"]),
    "do": peftlab.DoRAConfig(r=4, target_modules=["v_proj"]),
    "ha": peftlab.LoHaConfig(r=2, alpha=2, target_modules=["gate_proj"]),
    "kr": peftlab.LoKrConfig(r=2, alpha=2, target_modules=["up_proj"]),
}
TOKEN_ADAPTERS = {
    "pr": peftlab.PromptTuningConfig(num_virtual_tokens=3),
    "px": peftlab.PrefixTuningConfig(num_virtual_tokens=3, reparam=False),
}
ALL = {**LAYER_ADAPTERS, **TOKEN_ADAPTERS}
PREFIXES = ("lora_", "ia3_", "adapter_", "hada_", "lokr_", "prompt_", "prefix_")


def _perturb(model, seed=3):
    """Every adapter parameter random (adapters start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(t in n for t in PREFIXES):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _owners(model, trainable=True) -> set[str]:
    """The adapters whose parameters train (the name component of each parameter)."""
    return {
        part
        for n, p in model.named_parameters()
        if p.requires_grad == trainable
        for part in n.split(".")
        if part in ALL
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1] :]


@pytest.fixture
def mixed():
    model = tiny_llama()
    for name, cfg in ALL.items():
        peftlab.apply(model, cfg, adapter_name=name)
    _perturb(model)
    return model


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_adapter_alone_equals_a_model_with_only_it(mixed, name, batch, tmp_path):
    peftlab.set_adapter(mixed, name)
    peftlab.save_adapter(mixed, tmp_path / name, adapter_name=name)
    alone = peftlab.load_adapter(tiny_llama(), tmp_path / name, adapter_name=name)
    assert torch.allclose(_logits(mixed, batch), _logits(alone, batch), atol=1e-5)
    assert (_logits(alone, batch) - _logits(tiny_llama(), batch)).abs().max() > 1e-4
    trainable = {n for n, p in mixed.named_parameters() if p.requires_grad}
    assert trainable and all(f".{name}" in n for n in trainable)
    assert len(trainable) == sum(p.requires_grad for p in alone.parameters())


def test_layer_methods_active_together_compose(mixed, batch, tmp_path):
    """LoRA, DoRA, LoHa, LoKr folded into the weights, then IA³ and the bottleneck adapter
    loaded alone on that model: the same function as all six active on the mixed model."""
    names = sorted(LAYER_ADAPTERS)
    peftlab.set_adapter(mixed, names)
    assert peftlab.active_adapters(mixed) == tuple(names)
    ref = tiny_llama()
    for n in ("lo", "do", "ha", "kr"):
        peftlab.save_adapter(mixed, tmp_path / n, adapter_name=n)
        ref = peftlab.merge_and_unload(peftlab.load_adapter(ref, tmp_path / n, adapter_name=n))
    for n in ("ia", "bn"):
        peftlab.save_adapter(mixed, tmp_path / n, adapter_name=n)
    ref = peftlab.load_adapter(ref, tmp_path / "ia", adapter_name="ia")
    ref = peftlab.merge_and_unload(ref)  # IA³ is a weight scaling: mergeable too
    ref = peftlab.load_adapter(ref, tmp_path / "bn", adapter_name="bn")
    assert torch.allclose(_logits(mixed, batch), _logits(ref, batch), atol=1e-5)
    assert _owners(mixed) == set(names)


@pytest.mark.parametrize("token", sorted(TOKEN_ADAPTERS))
def test_a_virtual_token_adapter_composes_with_layer_adapters(mixed, token, batch, tmp_path):
    peftlab.set_adapter(mixed, ["lo", token])
    peftlab.save_adapter(mixed, tmp_path / "lo", adapter_name="lo")
    peftlab.save_adapter(mixed, tmp_path / token, adapter_name=token)
    ref = peftlab.merge_and_unload(peftlab.load_adapter(tiny_llama(), tmp_path / "lo"))
    ref = peftlab.load_adapter(ref, tmp_path / token, adapter_name=token)
    assert torch.allclose(_logits(mixed, batch), _logits(ref, batch), atol=1e-5)


def test_a_training_step_reaches_every_active_adapter(mixed, batch):
    peftlab.set_adapter(mixed, ["lo", "bn", "px"])
    mixed.train()
    before = {n: p.detach().clone() for n, p in mixed.named_parameters()}
    opt = torch.optim.SGD([p for p in mixed.parameters() if p.requires_grad], lr=0.1)
    mixed(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    changed = {
        part
        for n, p in mixed.named_parameters()
        if not p.equal(before[n])
        for part in n.split(".")
        if part in ALL
    }
    assert {"lo", "bn", "px"} <= changed
    assert not changed & {"ia", "do", "ha", "kr", "pr"}


def test_disable_adapters_gives_the_base_model(mixed, batch):
    peftlab.set_adapter(mixed, sorted(LAYER_ADAPTERS) + ["px"])
    with peftlab.disable_adapters(mixed):
        assert torch.allclose(_logits(mixed, batch), _logits(tiny_llama(), batch), atol=1e-6)
    assert not torch.allclose(_logits(mixed, batch), _logits(tiny_llama(), batch), atol=1e-3)


def _structure(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def test_refusals_leave_the_model_as_it_was(mixed, batch):
    peftlab.set_adapter(mixed, ["lo", "bn"])
    logits, structure = _logits(mixed, batch), _structure(mixed)
    refused = [
        (lambda: peftlab.apply(mixed, peftlab.IA3Config(target_modules=["q_proj"]), "x"),
         "q_proj already carries adapter\\(s\\) \\['lo'\\].*one method on a layer"),
        (lambda: peftlab.apply(mixed, peftlab.DoRAConfig(r=2, target_modules=["q_proj"]), "x"),
         "already carries"),
        (lambda: peftlab.apply(mixed, peftlab.LoRAConfig(r=2, target_modules="all-linear"), "x"),
         "already carries"),
        (lambda: peftlab.apply(mixed, peftlab.FullFinetuneConfig(), "x"),
         "full fine-tuning trains every weight"),
        (lambda: peftlab.set_adapter(mixed, ["pr", "px"]), "cannot be active together"),
        (lambda: peftlab.set_adapter(mixed, ["lo", "nope"]), "no adapter named 'nope'"),
        (lambda: peftlab.set_adapter(mixed, []), "adapter_name=\\[\\]"),
        (lambda: peftlab.set_adapter(mixed, None), "no adapter named None"),
        (lambda: peftlab.set_adapter(mixed, 3), "no adapter named 3"),
        (lambda: peftlab.set_adapter(mixed, {"lo": 1}), "no adapter named \\{'lo': 1\\}"),
        (lambda: peftlab.set_adapter(mixed, ["lo", "lo"]), "each once"),
        (lambda: peftlab.save_adapter(mixed, "never"), "several adapters are active"),
        (lambda: peftlab.delete_adapter(mixed, "nope"), "no adapter named 'nope'"),
        (lambda: peftlab.adapter_rows(mixed, ["lo", None]).__enter__(), "'bn' \\(adapter\\)"),
    ]  # fmt: skip
    for call, message in refused:
        with pytest.raises(ConfigError, match=message):
            call()
        assert _structure(mixed) == structure
        assert peftlab.active_adapters(mixed) == ("lo", "bn")
        assert torch.equal(_logits(mixed, batch), logits)


def test_full_finetuning_refuses_company():
    model = peftlab.apply(tiny_llama(), peftlab.FullFinetuneConfig())
    with pytest.raises(ConfigError, match="shares the model with no adapter of another"):
        peftlab.apply(model, peftlab.LoRAConfig(r=2), adapter_name="x")


def test_delete_adapter_keeps_the_others_exactly(mixed, batch):
    peftlab.set_adapter(mixed, ["lo", "bn", "px"])
    kept = {id(p) for n, p in mixed.named_parameters() if "adapter_" not in n}
    peftlab.delete_adapter(mixed, "bn")
    assert "bn" not in adapter_configs(mixed)
    assert peftlab.active_adapters(mixed) == ("lo", "px")
    assert not any("adapter_" in n for n, _ in mixed.named_parameters())
    assert not any(type(m).__name__ == "BottleneckAdapterLayer" for m in mixed.modules())
    assert {id(p) for p in mixed.parameters()} == kept  # the same tensors, not rebuilt ones
    ref = copy.deepcopy(mixed)
    # the prefix's last adapter goes with its module and hooks
    peftlab.delete_adapter(mixed, "px")
    assert not hasattr(mixed, "peftlab_prefix")
    peftlab.delete_adapter(ref, "px")
    assert torch.equal(_logits(mixed, batch), _logits(ref, batch))
    for name in ("lo", "ia", "do", "ha", "kr", "pr"):
        peftlab.delete_adapter(mixed, name)
    assert adapter_configs(mixed) == {}
    assert torch.allclose(_logits(mixed, batch), _logits(tiny_llama(), batch), atol=1e-6)
    assert sorted(n for n, _ in mixed.named_modules()) == sorted(
        n for n, _ in tiny_llama().named_modules()
    )


def test_delete_one_of_two_adapters_on_the_same_layers(batch, tmp_path):
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), name)
        _perturb(model, seed)
    peftlab.set_adapter(model, "b")
    peftlab.save_adapter(model, tmp_path / "b", adapter_name="b")
    peftlab.delete_adapter(model, "a")
    layer = model.model.layers[0].self_attn.q_proj
    assert list(layer.lora_A) == ["b"] and list(layer.scaling) == ["b"]
    alone = peftlab.load_adapter(tiny_llama(), tmp_path / "b", adapter_name="b")
    assert torch.allclose(_logits(model, batch), _logits(alone, batch), atol=1e-6)
    peftlab.delete_adapter(model, "b")
    assert peftlab.active_adapters(model) == ()


def test_delete_the_active_adapter_leaves_none_active(mixed, batch):
    peftlab.set_adapter(mixed, "lo")
    peftlab.delete_adapter(mixed, "lo")
    assert peftlab.active_adapters(mixed) == ()
    assert not any(p.requires_grad for p in mixed.parameters())
    peftlab.set_adapter(mixed, "do")
    assert any(p.requires_grad for p in mixed.parameters())


def test_delete_a_merged_adapter_is_refused(batch):
    model = tiny_llama()
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["q_proj"]), "a")
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["q_proj"]), "b")
    _perturb(model)
    peftlab.merge(model)
    logits = _logits(model, batch)
    with pytest.raises(ConfigError, match="merged into the base weights.*unmerge"):
        peftlab.delete_adapter(model, "b")
    assert torch.equal(_logits(model, batch), logits)
    peftlab.unmerge(model)
    peftlab.delete_adapter(model, "b")
    assert list(model.model.layers[0].self_attn.q_proj.lora_A) == ["a"]


def test_delete_restores_a_head_trained_in_full():
    model = tiny_bert()
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    peftlab.apply(model, peftlab.LoRAConfig(r=2, target_modules=["query"]), "cls")
    peftlab.apply(
        model, peftlab.IA3Config(target_modules=["value"], feedforward_modules=[],
                                 modules_to_save=[]), "ia")  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    peftlab.delete_adapter(model, "cls")
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, head[k])
    assert not any(p.requires_grad for p in model.classifier.parameters())
