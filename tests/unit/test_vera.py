"""VeRA against peft (the reference implementation): the same projections from the same key,
the same outputs and gradients from the same vectors, adapter files that load both ways (with
and without the projections stored); merge, several adapters, and one-line refusals."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.io import AdapterFileError
from peftlab.core.state import state_of
from peftlab.methods.vera import VeRALinear
from tests.conftest import TINY

peft = pytest.importorskip("peft")

# Layers of different shapes, so the shared pair is sliced (Llama: 32→32, 32→16, 64→32;
# GPT-2's Conv1D: 32→96, 32→32, 128→32).
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
ARCHS = sorted(TARGETS)


def _pair(arch: str, key: int = 7, save_projection: bool = True, **extra):
    """``(base, peft model, peftlab model)`` with the same targets, rank and key."""
    base = TINY[arch]()
    kw = dict(r=4, target_modules=TARGETS[arch], projection_prng_key=key)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.VeraConfig(**kw, save_projection=save_projection, **extra)
    )
    ours = peftlab.apply(
        copy.deepcopy(base), peftlab.VeRAConfig(**kw, save_projection=save_projection)
    )
    return base, theirs, ours


def _projection(model, name="default"):
    pair = model.peftlab_vera.vera_projection[name]
    return pair.A, pair.B


def _copy_perturbed(theirs, ours, seed=11) -> int:
    """Random λ's into peft's vectors and the same values into ours (names map 1:1)."""
    g = torch.Generator().manual_seed(seed)
    got = dict(ours.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                got[name.removeprefix("base_model.model.")].copy_(p)
                n += 1
    return n


def _forward(model, batch):
    emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    out.pow(2).mean().backward()
    return out.detach(), emb.grad


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_projections_equal_peft_and_parameters_map_one_to_one(arch):
    _, theirs, ours = _pair(arch)
    a, b = _projection(ours)
    torch.testing.assert_close(a, theirs.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(b, theirs.base_model.vera_B["default"], rtol=0, atol=0)
    shapes = {"llama": ((4, 64), (32, 4)), "gpt2": ((4, 128), (96, 4))}[arch]
    assert (tuple(a.shape), tuple(b.shape)) == shapes
    peft_params = {
        n.removeprefix("base_model.model."): p.shape
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    our_params = {n: p.shape for n, p in ours.named_parameters() if p.requires_grad}
    assert peft_params == our_params
    assert not any("vera_A" in n or "peftlab_vera" in n for n in our_params)  # buffers


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_and_gradients_match_peft(arch, batch):
    _, theirs, ours = _pair(arch)
    assert _copy_perturbed(theirs, ours) > 0
    out_t, grad_t = _forward(theirs, batch)
    out_o, grad_o = _forward(ours, batch)
    torch.testing.assert_close(out_o, out_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_t, rtol=0, atol=1e-5)
    got = dict(ours.named_parameters())
    n = 0
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(got[key].grad, p.grad, rtol=0, atol=1e-5)
            n += 1
    assert n == len([p for p in ours.parameters() if p.requires_grad])
    # The dense update merge adds is peft's (Conv1D's transposed back to [out, in]).
    for name, layer in ours.named_modules():
        if isinstance(layer, VeRALinear):
            delta = theirs.base_model.model.get_submodule(name).get_delta_weight("default")
            delta = delta.T if arch == "gpt2" else delta
            torch.testing.assert_close(layer.delta_weight("default"), delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_files_load_both_ways(arch, save_projection, batch, tmp_path):
    base, theirs, ours = _pair(arch, key=3, save_projection=save_projection)
    _copy_perturbed(theirs, ours, seed=5)
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    keys_ours = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    keys_theirs = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert keys_ours == keys_theirs
    pair = {"base_model.vera_A", "base_model.vera_B"}
    assert (pair <= keys_theirs) == save_projection and len(pair & keys_theirs) % 2 == 0
    doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "VERA" and doc["fan_in_fan_out"] == (arch == "gpt2")
    assert peftlab.read_adapter_config(tmp_path / "theirs") == peftlab.VeRAConfig(
        r=4,
        target_modules=sorted(TARGETS[arch]),
        projection_prng_key=3,
        save_projection=save_projection,
    )
    with warnings.catch_warnings():  # peft warns that it redraws the pair from the key
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    in_ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    want = _logits(theirs.eval(), batch)
    torch.testing.assert_close(_logits(ours, batch), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(in_peft, batch), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(in_ours, batch), want, rtol=0, atol=1e-5)
    again = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "ours")  # our own round trip
    torch.testing.assert_close(_logits(again, batch), _logits(ours, batch), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_identity_and_merge_unmerge_restore(arch, batch):
    base, _, ours = _pair(arch)
    ref = _logits(base, batch)
    torch.testing.assert_close(_logits(ours, batch), ref, rtol=0, atol=0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    out = _logits(ours, batch)
    assert not torch.allclose(out, ref)
    peftlab.merge(ours)
    torch.testing.assert_close(_logits(ours, batch), out, rtol=0, atol=1e-5)
    peftlab.unmerge(ours)
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(ours, batch), out, rtol=0, atol=1e-5)
    plain = peftlab.merge_and_unload(ours)
    assert not hasattr(plain, "peftlab_vera") and state_of(plain) is None
    torch.testing.assert_close(_logits(plain, batch), out, rtol=0, atol=1e-5)


def test_trainable_count_and_a_second_adapter_with_its_own_pair(batch):
    model = TINY["llama"]()
    peftlab.apply(model, peftlab.VeRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q: 32 + 4, v: 16 + 4, per layer, 2 layers
    assert peftlab.trainable_parameters(model)[0] == 2 * (36 + 20)
    cfg = peftlab.VeRAConfig(r=6, target_modules=["v_proj"], projection_prng_key=9)
    peftlab.apply(model, cfg, "second")
    a1, b1 = _projection(model)
    a2, b2 = _projection(model, "second")
    assert (tuple(a1.shape), tuple(b1.shape)) == ((4, 32), (32, 4))
    assert (tuple(a2.shape), tuple(b2.shape)) == ((6, 32), (16, 6))
    v = model.model.layers[0].self_attn.v_proj
    assert v._projections["second"] is model.peftlab_vera.vera_projection["second"]
    peftlab.set_adapter(model, ["default", "second"])
    both = _logits(model, batch)
    peftlab.delete_adapter(model, "second")
    assert list(model.peftlab_vera.vera_projection) == ["default"]
    assert "second" not in v._projections
    peftlab.unload(model)
    assert "peftlab_vera" not in model._modules
    assert both.shape == (2, 9, 128)


def _fingerprint(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
        state_of(model),
    )


def _assert_unchanged(model, before):
    after = _fingerprint(model)
    assert after[0] == before[0] and after[2] is before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"r": 0}, r"^r=0 is invalid: r must be a positive integer"),
        ({"r": -4}, r"^r=-4 is invalid"),
        ({"d_initial": float("inf")}, r"^d_initial=inf is invalid: d_initial must be"),
        ({"d_initial": float("nan")}, r"^d_initial=nan is invalid"),
        ({"d_initial": 0.0}, r"^d_initial=0.0 is invalid: .*non-zero"),
        ({"dropout": 1.0}, r"^dropout=1.0 is invalid: dropout must be in \[0, 1\)"),
        ({"projection_prng_key": -1}, r"^projection_prng_key=-1 is invalid"),
    ],
)
def test_bad_values_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        peftlab.VeRAConfig(**bad)
    assert "\n" not in str(e.value)


def test_a_4bit_base_is_refused_and_the_model_is_unchanged():
    model = TINY["llama"]()
    model.model.layers[1].self_attn.v_proj.weight.quant_state = object()  # as bitsandbytes marks it
    before = _fingerprint(model)
    with pytest.raises(ConfigError, match=r"v_proj is a 4-bit layer; VeRA needs a 16/32-bit") as e:
        peftlab.apply(model, peftlab.VeRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "\n" not in str(e.value)
    _assert_unchanged(model, before)


def test_a_file_whose_projection_is_too_small_is_refused(tmp_path):
    source = peftlab.apply(
        TINY["llama"](), peftlab.VeRAConfig(r=4, target_modules=TARGETS["llama"])
    )
    peftlab.save_adapter(source, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tuple(tensors["base_model.vera_A"].shape) == (4, 64)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :32].contiguous()  # q/v only
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = TINY["llama"]()
    before = _fingerprint(model)
    with pytest.raises(
        AdapterFileError, match=r"base_model.vera_A: file \(4, 32\) vs model \(4, 64\)"
    ) as e:
        peftlab.load_adapter(model, tmp_path)
    assert "\n" not in str(e.value)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"layers_to_transform": [0]}, "layers_to_transform=.*not supported for VeRA"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, r"missing keys \[.base_model.model.lm_head.weight.\]"),
        ({"vera_dropout": 2.0}, r"^.*vera_dropout=2.0 is invalid: vera_dropout must be"),
        ({"r": 0}, "r=0 is invalid"),
    ],
)
def test_peft_files_with_unsupported_options_are_refused(edit, match, tmp_path):
    _, theirs, _ = _pair("llama")
    theirs.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    doc.update(edit)
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    model = TINY["llama"]()
    before = _fingerprint(model)
    with pytest.raises(AdapterFileError, match=match) as e:
        peftlab.load_adapter(model, tmp_path)
    assert "\n" not in str(e.value)
    _assert_unchanged(model, before)
