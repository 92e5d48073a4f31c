"""IA³: defaults per architecture, the formula on one layer, merging, I/O, parity with peft, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import peftlab
from peftlab import ConfigError, IA3Config
from peftlab.methods.ia3 import IA3Linear
from tests.conftest import TINY, tiny_gpt2, tiny_llama

# peft 0.21's defaults: (layer scaled, feed-forward) per tiny model, block 0.
DEFAULT_LAYERS = {
    "llama": {
        "model.layers.0.self_attn.k_proj": False,
        "model.layers.0.self_attn.v_proj": False,
        "model.layers.0.mlp.down_proj": True,
    },
    "gpt2": {"transformer.h.0.attn.c_attn": False, "transformer.h.0.mlp.c_proj": True},
    "bert": {
        "bert.encoder.layer.0.attention.self.key": False,
        "bert.encoder.layer.0.attention.self.value": False,
        "bert.encoder.layer.0.attention.output.dense": True,
        "bert.encoder.layer.0.output.dense": True,
    },
}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def _randomize(model, seed=0):
    """Vectors around one, so that every layer's scaling is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _ia3_layers(model) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def test_default_targets_and_sides_per_architecture(tiny_arch, batch):
    base = TINY[tiny_arch]()
    model = peftlab.apply(copy.deepcopy(base), IA3Config())
    layers = _ia3_layers(model)
    assert len(layers) == 2 * len(DEFAULT_LAYERS[tiny_arch])  # two blocks
    for name, feedforward in DEFAULT_LAYERS[tiny_arch].items():
        layer = layers[name]
        assert layer.feedforward["default"] is feedforward
        vec = layer.ia3_l["default"]
        shape = (1, layer.in_features) if feedforward else (layer.out_features, 1)
        assert vec.shape == shape and torch.equal(vec, torch.ones(shape))
    torch.testing.assert_close(_logits(model, batch), _logits(base, batch), rtol=0, atol=0)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    expected = sum(m.ia3_l["default"].numel() for m in layers.values()) + head
    assert peftlab.trainable_parameters(model)[0] == expected


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("feedforward", [False, True])
def test_formula_on_one_layer(feedforward, bias):
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, bias=bias)
    layer = IA3Linear(linear)
    layer.add_adapter("a", feedforward)
    layer.set_adapter(["a"])
    vec = torch.tensor([0.5, 2.0, -1.0, 3.0, 0.25, 1.5][: 6 if feedforward else 4])
    with torch.no_grad():
        layer.ia3_l["a"].copy_(vec.view(layer.ia3_l["a"].shape))
    x = torch.randn(3, 5, 6)
    w = linear.weight.detach().clone()
    b = linear.bias.detach().clone() if bias else torch.zeros(4)
    if feedforward:  # y = W (l ⊙ x) + b
        expected = torch.einsum("oi,bti->bto", w, vec * x) + b
    else:  # y = l ⊙ (W x + b)
        expected = vec * (torch.einsum("oi,bti->bto", w, x) + b)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    merged_w = w * (vec[None, :] if feedforward else vec[:, None])
    torch.testing.assert_close(linear.weight.detach(), merged_w)


def test_gpt2_conv1d_formula():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn  # Conv1D, weight [in, out]
    x = torch.randn(2, 3, conv.weight.shape[0])
    peftlab.apply(model, IA3Config())
    layer = model.transformer.h[0].attn.c_attn
    _randomize(model)
    vec = layer.ia3_l["default"].detach().view(-1)
    torch.testing.assert_close(layer(x), vec * (x @ conv.weight + conv.bias), rtol=0, atol=1e-6)


def _outputs(model, batch):
    """The last hidden states: a tiny BERT's classifier logits barely move (post-norm blocks)."""
    with torch.no_grad():
        return model(input_ids=batch, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_unmerge_and_merge_and_unload_are_exact(arch, batch):
    base = TINY[arch]()
    model = peftlab.apply(copy.deepcopy(base), IA3Config())
    _randomize(model)
    adapted = _outputs(model, batch)
    assert not torch.allclose(adapted, _outputs(base, batch), atol=1e-2)
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    peftlab.merge(model)
    torch.testing.assert_close(_outputs(model, batch), adapted, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(_outputs(model, batch), adapted, rtol=0, atol=1e-5)
    for name, m in _ia3_layers(model).items():
        torch.testing.assert_close(
            m.base_layer.weight, weights[f"{name}.weight"], atol=1e-6, rtol=0
        )
    plain = peftlab.merge_and_unload(model)
    assert not _ia3_layers(plain)
    torch.testing.assert_close(_outputs(plain, batch), adapted, rtol=0, atol=1e-5)


def test_zero_entries_unmerge_exactly(batch):
    """A zero in l wipes a weight row when merged; unmerge restores it instead of dividing by
    zero."""
    model = peftlab.apply(tiny_llama(), IA3Config())
    _randomize(model)
    layer = model.model.layers[0].self_attn.v_proj
    ff = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.ia3_l["default"][[0, 5]] = 0.0
        ff.ia3_l["default"][0, [1, 7]] = 0.0
    before = [layer.base_layer.weight.detach().clone(), ff.base_layer.weight.detach().clone()]
    adapted = _logits(model, batch)
    peftlab.merge(model)
    assert torch.all(layer.base_layer.weight[[0, 5]] == 0)
    assert torch.all(ff.base_layer.weight[:, [1, 7]] == 0)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, before[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ff.base_layer.weight, before[1], rtol=0, atol=1e-6)
    assert torch.isfinite(_logits(model, batch)).all()
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=0, atol=1e-5)


def test_save_load_round_trip_writes_the_defaults_out(batch, tmp_path):
    model = peftlab.apply(tiny_llama(), IA3Config())
    _randomize(model, seed=2)
    out = _logits(model, batch)
    peftlab.save_adapter(model, tmp_path)
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["peft_type"] == "IA3"
    assert doc["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    assert doc["feedforward_modules"] == ["down_proj"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.ia3_l"].shape == (1, 64)
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), out, rtol=0, atol=0)


def test_loss_falls_in_a_few_steps(batch):
    model = peftlab.apply(tiny_llama(), IA3Config()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = model(input_ids=batch, labels=batch).loss.item()
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(input_ids=batch, labels=batch).loss.item() < first - 0.01


# ---- parity with peft -----------------------------------------------------------------------

peft = pytest.importorskip("peft")
PARITY = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _peft_and_ours(arch: str, targets=None, feedforward=None):
    base = PARITY[arch]()
    cfg = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = peftlab.apply(
        copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=feedforward)
    )
    _randomize(pm, seed=4)
    theirs = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters()}
    mine = {n: p for n, p in ours.named_parameters() if "ia3_l" in n}
    assert set(mine) == {n for n in theirs if "ia3_l" in n}
    with torch.no_grad():
        for n, p in mine.items():
            assert p.shape == theirs[n].shape, n
            p.copy_(theirs[n])
    return base, pm, ours


def _forward(model, batch):
    emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    out.pow(2).mean().backward()
    return out.detach(), emb.grad


@pytest.mark.parametrize(
    "targets,feedforward",
    [(None, None), ("all-linear", None)],
    ids=["defaults", "all-linear"],
)
@pytest.mark.parametrize("arch", sorted(PARITY))
def test_outputs_and_gradients_match_peft(arch, targets, feedforward, batch):
    if targets == "all-linear":  # peft reads no default beside a string: name the FFN layer
        feedforward = ["down_proj"] if arch == "llama" else ["mlp.c_proj"]
    _, pm, ours = _peft_and_ours(arch, targets, feedforward)
    out_p, grad_p = _forward(pm, batch)
    out_o, grad_o = _forward(ours, batch)
    torch.testing.assert_close(out_o, out_p, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_p, rtol=0, atol=1e-5)
    mine = dict(ours.named_parameters())
    for name, p in pm.named_parameters():
        if p.grad is not None:
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(mine[key].grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(PARITY))
def test_peft_loads_peftlab_adapter(arch, batch, tmp_path):
    base, pm, ours = _peft_and_ours(arch)
    peftlab.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(loaded.peft_config["default"]).__name__ == "IA3Config"
    torch.testing.assert_close(_logits(loaded, batch), _logits(ours, batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(loaded, batch), _logits(pm, batch), rtol=0, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_modules": []}, r"^target_modules=\(\) is invalid: target_modules must be None"),
        ({"target_modules": ""}, r"^target_modules='' is invalid: target_modules must be"),
        ({"target_modules": "k_proj("}, r"^target_modules='k_proj\(' is not a valid regex"),
        ({"feedforward_modules": "("}, r"^feedforward_modules='\(' is not a valid regex"),
        (
            {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
            r"^feedforward_modules=\['down_proj'\] is invalid: feedforward_modules must be a "
            r"subset of target_modules \['k_proj'\]",
        ),
        ({"init_ia3_weights": 1}, r"^init_ia3_weights=1 is invalid: .* true or false"),
    ],
)
def test_bad_config_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        IA3Config(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_targets_on_a_model_are_one_line_errors():
    with pytest.raises(ConfigError, match="target module 'nowhere' matches no module"):
        peftlab.apply(tiny_llama(), IA3Config(target_modules=["nowhere"]))
    with pytest.raises(ConfigError, match="feedforward_modules entry 'lm_head' matches none"):
        peftlab.apply(
            tiny_llama(), IA3Config(target_modules="all-linear", feedforward_modules=["lm_head"])
        )
    with pytest.raises(ConfigError, match=r"^feedforward_modules=\['mlp.down_proj'\] is invalid"):
        peftlab.apply(tiny_llama(), IA3Config(feedforward_modules=["mlp.down_proj"]))
    # A type outside peft's table: the same layers are read from its blocks (an unreadable
    # one is refused: tests/unit/test_architecture_reach.py).
    model = tiny_llama()
    model.config.model_type = "mystery"
    read = _ia3_layers(peftlab.apply(copy.deepcopy(model), IA3Config()))
    assert {n.rsplit(".", 1)[-1] for n in read} == {"k_proj", "v_proj", "down_proj"}
    assert {n for n, m in read.items() if m.feedforward["default"]} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    # Explicit targets and feed-forward modules work on any architecture.
    peftlab.apply(model, IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    assert not any(m.feedforward["default"] for m in _ia3_layers(model).values())
