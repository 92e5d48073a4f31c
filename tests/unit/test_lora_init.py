"""PiSSA and OLoRA initialization (peftlab/methods/_lora_init.py): the adapted model equals the
base at init, the factors and residual match peft's, an adapter reloads on the original base
(peftlab and peft), a conventional rank-2r adapter equals it, unloading restores the base, and
what cannot hold a residual base is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from tests.conftest import TINY

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
INITS = ["pissa", "olora"]


def _apply(base, init, arch, **kw):
    cfg = peftlab.LoRAConfig(r=4, alpha=8, target_modules=TARGETS[arch], init=init, **kw)
    return peftlab.apply(copy.deepcopy(base), cfg)


def _train_a_step(model, batch):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_the_adapted_model_is_the_base_at_init_and_unload_restores_it(arch, init, batch):
    base = TINY[arch]().eval()
    model = _apply(base, init, arch).eval()
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    assert layer.lora_B["default"].weight.abs().max() > 0  # trains from a principal part
    torch.testing.assert_close(_logits(model, batch), _logits(base, batch), rtol=0, atol=1e-5)
    plain = peftlab.unload(model)  # without merging: the original weights, not the residual
    for (n, a), b in zip(plain.state_dict().items(), base.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_match_peft(init, batch):
    base = TINY["llama"]().eval()
    ours = _apply(base, init, "llama")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    got = dict(ours.named_parameters())
    n = 0
    for name, p in theirs.named_parameters():
        key = name.removeprefix("base_model.model.")
        if key.endswith(".base_layer.weight") or "lora_" in key:
            torch.testing.assert_close(got[key], p, rtol=0, atol=1e-5, msg=key)
            n += 1
    assert n == 2 * 3 * 3  # two layers × three targets × (residual, A, B)


@pytest.mark.parametrize("init", INITS)
def test_a_trained_adapter_reloads_on_the_original_base_and_as_a_conventional_lora(
    init, batch, tmp_path
):
    base = TINY["llama"]().eval()
    model = _apply(base, init, "llama")
    _train_a_step(model, batch)
    model.eval()
    want = _logits(model, batch)
    peftlab.save_adapter(model, tmp_path / "own")
    peftlab.save_adapter(model, tmp_path / "conv", conventional=True)
    again = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "own").eval()
    torch.testing.assert_close(_logits(again, batch), want, rtol=0, atol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "own").eval()
    torch.testing.assert_close(_logits(in_peft, batch), want, rtol=0, atol=1e-5)
    conv = peftlab.read_adapter_config(tmp_path / "conv")
    assert (conv.init, conv.r, conv.scaling) == ("kaiming", 8, 2.0)  # rank 2r, same scaling
    plain = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "conv").eval()
    torch.testing.assert_close(_logits(plain, batch), want, rtol=0, atol=1e-5)
    merged = peftlab.merge_and_unload(plain)  # a plain LoRA: merges exactly into the base
    torch.testing.assert_close(_logits(merged, batch), want, rtol=0, atol=1e-5)


def test_what_cannot_hold_a_residual_base_is_refused(batch, tmp_path):
    base = TINY["llama"]()
    with pytest.raises(ConfigError, match="init='pissa' is invalid"):
        peftlab.DoRAConfig(init="pissa")
    with pytest.raises(ConfigError, match="r=40 is invalid with init='pissa'"):
        peftlab.apply(copy.deepcopy(base), peftlab.LoRAConfig(r=40, init="pissa"))
    model = _apply(base, "pissa", "llama")
    before = _logits(model, batch)
    for act in (
        lambda: peftlab.apply(model, peftlab.LoRAConfig(r=2), "second"),
        lambda: peftlab.combine(model, {"default": 1.0}),
        lambda: peftlab.adapter_rows(model, ["default", None]).__enter__(),
    ):
        with pytest.raises(ConfigError, match="pissa"):
            act()
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)  # unchanged
    other = peftlab.apply(copy.deepcopy(base), peftlab.LoRAConfig(r=2), "plain")
    with pytest.raises(ConfigError, match="cannot share the model"):
        peftlab.apply(other, peftlab.LoRAConfig(r=2, init="olora"), "x")


@pytest.mark.parametrize("init", INITS)
def test_a_peft_pissa_or_olora_adapter_loads_in_peftlab(init, batch, tmp_path):
    base = TINY["llama"]().eval()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _train_a_step(theirs, batch)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert peftlab.read_adapter_config(tmp_path).init == init
    torch.testing.assert_close(
        _logits(ours, batch), _logits(theirs.eval(), batch), rtol=0, atol=1e-5
    )
