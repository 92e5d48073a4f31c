"""The fused LoRA/DoRA autograd node equals autograd's own graph of the same formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.methods.dora import DoRAConfig, DoRALinear
from peftlab.methods.lora import LoRAConfig, LoRALinear


def _layer(cls, config, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).requires_grad_(False)
    layer = cls(base)
    layer.add_adapter("default", config)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init would hide A's gradient
    layer.set_adapter(["default"])
    return layer


def _run(layer, x, fused: bool, monkeypatch):
    if not fused:
        monkeypatch.setattr(type(layer), "fused_forward", lambda *a, **k: None)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1])).sum(), inputs)
    monkeypatch.undo()
    return y, grads


@pytest.mark.parametrize(
    "cls,config", [(LoRALinear, LoRAConfig(r=3)), (DoRALinear, DoRAConfig(r=3))]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [False, True])
def test_fused_matches_autograd(cls, config, bias, x_grad, monkeypatch):
    layer = _layer(cls, config, bias)
    x = torch.randn(2, 5, 12, requires_grad=x_grad)
    called = []
    orig = cls.fused_forward
    monkeypatch.setattr(cls, "fused_forward", lambda *a, **k: called.append(1) or orig(*a, **k))
    y_fused, g_fused = _run(layer, x, True, monkeypatch)
    assert called, "the fused path did not run"
    y_ref, g_ref = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(y_fused, y_ref, atol=1e-6, rtol=1e-5)
    assert len(g_fused) == len(g_ref)
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_with_a_frozen_skips_its_gradient():
    layer = _layer(LoRALinear, LoRAConfig(r=3), bias=True)
    layer.lora_A["default"].weight.requires_grad_(False)
    x = torch.randn(4, 12)
    layer(x).sum().backward()
    assert layer.lora_A["default"].weight.grad is None
    assert layer.lora_B["default"].weight.grad is not None


def test_fallbacks_dropout_and_dtype():
    layer = _layer(LoRALinear, LoRAConfig(r=3, dropout=0.5), bias=False)
    layer.train()
    x = torch.randn(4, 12)
    assert layer.fused_forward(x) is None  # dropout in training: autograd's graph
    layer.eval()
    assert layer.fused_forward(x) is not None
    assert layer.fused_forward(x.double()) is None  # dtypes differ


def test_two_active_adapters_and_merged_state():
    layer = _layer(LoRALinear, LoRAConfig(r=3), bias=True)
    layer.add_adapter("second", LoRAConfig(r=2))
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_()
    layer.set_adapter(["default", "second"])
    x = torch.randn(4, 12)
    expected = layer.base_layer(x) + sum(
        nn.functional.linear(x, layer.delta_weight(n)) for n in ("default", "second")
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_hooked_base_layer_is_called_as_a_module():
    """accelerate's offloading puts weights in place from a hook: the fused path must not
    read the weight behind the module's back."""
    layer = _layer(LoRALinear, LoRAConfig(r=3), bias=False)
    calls = []
    layer.base_layer.register_forward_pre_hook(lambda mod, args: calls.append(1))
    x = torch.randn(4, 12)
    assert layer.fused_forward(x) is None
    layer(x)
    layer.merge()
    layer(x)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "cls,config", [(LoRALinear, LoRAConfig(r=3)), (DoRALinear, DoRAConfig(r=3))]
)
def test_cached_plan_follows_disable_merge_and_late_hooks(cls, config):
    """The cached plan (fused adapter, or base layer alone) is rebuilt when adapters are
    switched off or merged, and a hook added after it was cached still runs."""
    layer = _layer(cls, config, bias=True).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        base_y = layer.base_layer(x)
        adapted = layer(x)  # caches the fused plan
        assert not torch.allclose(adapted, base_y)
        layer.disabled = True
        torch.testing.assert_close(layer(x), base_y)
        layer.disabled = False
        torch.testing.assert_close(layer(x), adapted)
        layer.merge()
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        seen = []
        layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out))
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        assert len(seen) == 1
        layer.unmerge()
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls,config", [(LoRALinear, LoRAConfig(r=3)), (DoRALinear, DoRAConfig(r=3))]
)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_under_autocast_matches_autograd(cls, config, bias, monkeypatch):
    """Under bf16 autocast the node runs on bf16 casts of its operands, as autocast's own
    F.linear would; output and gradients agree with autograd's graph of the same casts."""
    layer = _layer(cls, config, bias)
    x = torch.randn(2, 5, 12, requires_grad=True)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(layer, x, fused, monkeypatch))
    (y_f, g_f), (y_u, g_u) = results
    assert y_f.dtype == y_u.dtype == torch.bfloat16
    torch.testing.assert_close(y_f, y_u, rtol=2e-2, atol=2e-2)
    params = [p for p in layer.parameters() if p.requires_grad]
    for g1, g2, t in zip(g_f, g_u, [x, *params]):
        assert g1.dtype == t.dtype  # gradients come back in the parameters' own dtype
        torch.testing.assert_close(g1, g2, rtol=3e-2, atol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    nodes = [y.grad_fn]
    for _ in range(2):  # the node itself (LoRA), or under DoRA's rescale
        nodes += [f for n in nodes for f, _ in n.next_functions if f is not None]
    names = {type(n).__name__ for n in nodes}
    assert "_LoRAMatmulBackward" in names, names


@pytest.mark.parametrize(
    "cls,config", [(LoRALinear, LoRAConfig(r=3)), (DoRALinear, DoRAConfig(r=3))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_in_place_equals_the_out_of_place_formula(cls, config, dtype):
    """A float32 weight is merged and unmerged in its own storage; a bfloat16 base under
    float32 factors takes the out-of-place formula. Both give the same weights."""
    layer = _layer(cls, config, bias=True)
    layer.base_layer.to(dtype)
    w = layer.base_layer.weight
    w0, ptr = w.detach().clone(), w.data_ptr()
    expected = layer._merged_weight("default", w0.clone())
    layer.merge()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(layer.base_layer.weight, expected, **tol)
    assert layer.base_layer.weight.data_ptr() == ptr
    layer.unmerge()
    torch.testing.assert_close(
        layer.base_layer.weight, w0, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-2
    )
