"""Bottleneck adapters: placement, closed-form size, identity at init, training, I/O, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import peftlab
from peftlab import AdapterConfig, ConfigError
from peftlab.core.state import adapter_configs
from peftlab.methods.adapter import BottleneckAdapterLayer
from tests.conftest import TINY, tiny_llama

# The output projections each placement must find, per block, in the tiny models.
SITES = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
    "bert": (
        "bert.encoder.layer.{i}.attention.output.dense",
        "bert.encoder.layer.{i}.output.dense",
    ),
}
PLACEMENTS = {"houlsby": 2, "pfeiffer": 1}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def _loss(model, batch):
    if type(model).__name__.endswith("ForSequenceClassification"):
        return model(input_ids=batch, labels=torch.tensor([0, 1])).loss
    return model(input_ids=batch, labels=batch).loss


def _sites(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckAdapterLayer))


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_placement_and_closed_form_parameter_count(tiny_arch, placement):
    model = TINY[tiny_arch]()
    d, layers, m = model.config.hidden_size, model.config.num_hidden_layers, 8
    attn, ffn = SITES[tiny_arch]
    per_block = (attn, ffn) if placement == "houlsby" else (ffn,)
    # modules_to_save=[]: BERT's new classifier head would train too (the count is the adapters').
    peftlab.apply(model, AdapterConfig(bottleneck=m, placement=placement, modules_to_save=[]))

    assert _sites(model) == sorted(s.format(i=i) for i in range(layers) for s in per_block)
    trainable, _ = peftlab.trainable_parameters(model)
    # Each adapter: down (d·m + m) and up (m·d + d).
    assert trainable == layers * PLACEMENTS[placement] * (2 * d * m + d + m)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert f"{ffn.format(i=0)}.adapter_down.default.weight" in names
    assert all(".adapter_down.default." in n or ".adapter_up.default." in n for n in names)


def test_reduction_factor_sets_the_bottleneck():
    model = peftlab.apply(tiny_llama(), AdapterConfig(reduction_factor=4))  # 32 // 4 = 8
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.adapter_down["default"].weight.shape == (8, 32)
    assert AdapterConfig().bottleneck_size(576) == 36  # default factor 16, SmolLM2's width


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_zero_init_leaves_logits_unchanged_and_training_changes_them(tiny_arch, placement, batch):
    base = TINY[tiny_arch]()
    ref = _logits(base, batch)
    model = peftlab.apply(
        copy.deepcopy(base), AdapterConfig(bottleneck=8, placement=placement, activation="gelu")
    )
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)  # exact identity

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    trained = _logits(model, batch)
    assert (trained - ref).abs().max() > 1e-5
    with peftlab.disable_adapters(model):
        torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, batch), trained, rtol=0, atol=0)


def test_forward_is_the_bottleneck_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    layer = BottleneckAdapterLayer(base)
    layer.add_adapter("a", AdapterConfig(bottleneck=3, activation="tanh"))
    layer.set_adapter(["a"])
    with torch.no_grad():
        for p in layer.adapter_up.parameters():
            p.normal_()
    x = torch.randn(2, 5, 6)
    h = base(x)
    down, up = layer.adapter_down["a"], layer.adapter_up["a"]
    expected = h + torch.tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_save_load_round_trip(tmp_path, batch):
    model = peftlab.apply(tiny_llama(), AdapterConfig(bottleneck=4, placement="pfeiffer"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    out = _logits(model, batch)
    peftlab.save_adapter(model, tmp_path)

    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 2 * 4  # 2 layers × (down, up) × (weight, bias)
    assert "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight" in keys
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["peftlab"]["config"]["placement"] == "pfeiffer"

    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    assert adapter_configs(loaded)["default"] == adapter_configs(model)["default"]
    torch.testing.assert_close(_logits(loaded, batch), out, rtol=0, atol=0)


def test_trains_with_gradient_checkpointing(batch):
    """Gradients through checkpointed blocks equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = peftlab.apply(tiny_llama(), AdapterConfig(bottleneck=4))
        with torch.no_grad():  # non-zero up-projections, so the down-projections get gradients
            for n, p in model.named_parameters():
                if "adapter_up" in n:
                    p.normal_(0, 0.1)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        model.train()
        _loss(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert set(plain) == set(ckpt) and len(plain) == 2 * 2 * 4
    for n in plain:
        assert ckpt[n] is not None and ckpt[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_merge_is_refused_and_unload_restores_the_base(batch):
    base = tiny_llama()
    ref = _logits(base, batch)
    model = peftlab.apply(copy.deepcopy(base), AdapterConfig(bottleneck=4))
    with pytest.raises(ConfigError, match="adapter cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(ConfigError, match="cannot be merged"):
        peftlab.merge_and_unload(model)
    with pytest.raises(ConfigError, match="nonlinear"):
        model.get_submodule("model.layers.0.mlp.down_proj").unload(merge=True)
    plain = peftlab.unload(model)
    assert not _sites(plain)
    assert type(plain.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(plain, batch), ref, rtol=0, atol=0)


def test_named_adapters_share_wrappers_and_switch(batch):
    model = peftlab.apply(tiny_llama(), AdapterConfig(bottleneck=4))
    peftlab.apply(model, AdapterConfig(bottleneck=2, placement="pfeiffer"), adapter_name="b")
    ffn = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(ffn.base_layer, nn.Linear) and sorted(ffn.adapter_down) == ["b", "default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    assert peftlab.trainable_parameters(model)[0] == 2 * (2 * 32 * 2 + 32 + 2)
    peftlab.set_adapter(model, "default")
    assert all(".default." in n for n, p in model.named_parameters() if p.requires_grad)
    assert ffn.active == ["default"]


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"bottleneck": 0}, "bottleneck"),
        ({"bottleneck": -4}, "bottleneck"),
        ({"bottleneck": 2.5}, "bottleneck"),
        ({"bottleneck": 8, "reduction_factor": 4}, "reduction_factor"),
        ({"reduction_factor": 0.5}, "reduction_factor"),
        ({"placement": "parallel"}, "placement"),
        ({"activation": "softmax"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"init_scale": -1e-3}, "init_scale"),
    ],
)
def test_bad_config_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}=") as err:
        AdapterConfig(**kwargs)
    assert "must be" in str(err.value)


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match="'houlsby' or 'pfeiffer'"):
        AdapterConfig(placement="parallel")
    with pytest.raises(ConfigError, match="'relu', 'gelu', 'swish', 'silu', 'tanh'"):
        AdapterConfig(activation="softmax")


def test_bottleneck_larger_than_hidden_size_is_refused_before_any_change():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"bottleneck=64 .*at most the hidden size 32"):
        peftlab.apply(model, AdapterConfig(bottleneck=64))
    with pytest.raises(ConfigError, match=r"reduction_factor=64 .*hidden size 32"):
        peftlab.apply(tiny_llama(), AdapterConfig(reduction_factor=64))  # 32 // 64 = 0
    assert not _sites(model)


def test_unplaceable_architecture_names_itself_and_the_way_out():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    moe = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=2,
        )
    )
    with pytest.raises(
        ConfigError, match=r"MixtralForCausalLM \(model_type='mixtral'\).*target_modules"
    ):
        peftlab.apply(moe, AdapterConfig(bottleneck=4))
    with pytest.raises(ConfigError, match="Sequential.*found no transformer block"):
        peftlab.apply(
            nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4)), AdapterConfig(bottleneck=2)
        )
    # The way out the message names: explicit targets.
    peftlab.apply(moe, AdapterConfig(bottleneck=4, target_modules=["o_proj"]))
    assert _sites(moe) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
