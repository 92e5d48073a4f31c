"""The LoRA/DoRA fast path (cached plan, fused autograd node) against the plain formula.

Exactness tests run both ways through the ``fast`` fixture: with the fast path on, and with
it off (``fast_path(False)``: every layer computes the plain composed formula).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect

import pytest
import torch
from torch import nn

from peftlab.methods import _lora_fused, dora, lora, qlora
from peftlab.methods.dora import DoRAConfig, DoRALinear
from peftlab.methods.lora import LoRAConfig, LoRALinear, fast_path, fast_path_enabled
from tests.unit.test_peft_parity import test_outputs_and_input_grads_match_peft as _peft_parity

BOTH = [(LoRALinear, LoRAConfig(r=3)), (DoRALinear, DoRAConfig(r=3))]


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def fast(request):
    """Run the test with the fast path on, then off."""
    with fast_path(request.param):
        yield request.param


def _layer(cls, config, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).requires_grad_(False)
    layer = cls(base)
    layer.add_adapter("default", config)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init would hide A's gradient
    layer.set_adapter(["default"])
    return layer


def _grads(layer, x, y) -> tuple:
    """Gradients of a fixed weighting of ``y`` for x (if it requires one) and every
    trainable parameter; zeros for those the forward did not use."""
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params
    loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))


def _run(layer, x, fused: bool, monkeypatch):
    """Forward and gradients; ``fused=False`` keeps the fused node out (the general path)."""
    if not fused:
        monkeypatch.setattr(LoRALinear, "_fused", staticmethod(lambda *a, **k: None))
    y = layer(x)
    grads = _grads(layer, x, y)
    monkeypatch.undo()
    return y, grads


def _count_fused(monkeypatch) -> list:
    called = []
    orig = lora.fused
    monkeypatch.setattr(lora, "fused", lambda *a: called.append(1) or orig(*a))
    return called


@pytest.mark.parametrize("cls,config", BOTH)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [False, True])
def test_fused_matches_autograd(cls, config, bias, x_grad, monkeypatch):
    layer = _layer(cls, config, bias)
    x = torch.randn(2, 5, 12, requires_grad=x_grad)
    called = _count_fused(monkeypatch)
    y = layer(x)
    assert called, "the fused path did not run"
    y_fused, g_fused = y, _grads(layer, x, y)
    monkeypatch.undo()
    y_ref, g_ref = _run(layer, x, False, monkeypatch)
    with fast_path(False):
        y_plain, g_plain = _run(layer, x, True, monkeypatch)
    for y_other, g_other in ((y_ref, g_ref), (y_plain, g_plain)):
        torch.testing.assert_close(y_fused, y_other, atol=1e-6, rtol=1e-5)
        assert len(g_fused) == len(g_other)
        for a, b in zip(g_fused, g_other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_with_a_frozen_skips_its_gradient(fast):
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
    with fast_path(False):
        assert layer.fused_forward(x) is None


def test_two_active_adapters_and_merged_state(fast):
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


def test_hooked_base_layer_is_called_as_a_module(fast):
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


@pytest.mark.parametrize("cls,config", BOTH)
def test_global_and_backward_hooks_see_the_base_layer(cls, config, fast):
    """Hooks registered for every module (torch's global registries) or for the backward of
    the base layer run as they would on the bare model, even once the plan is cached."""
    layer = _layer(cls, config, bias=True)
    x = torch.randn(4, 12, requires_grad=True)
    layer(x)  # caches the plan
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append(mod) if mod is layer.base_layer else None
    )
    try:
        layer(x)
    finally:
        handle.remove()
    assert seen == [layer.base_layer]
    grads = []
    layer.base_layer.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout))
    layer(x).sum().backward()
    assert len(grads) == 1


@pytest.mark.parametrize("cls,config", BOTH)
def test_cached_plan_follows_state_changes(cls, config, fast):
    """The cached plan (fused adapter, or base layer alone) is rebuilt when adapters are
    switched off or merged, the base layer is replaced, or the dtype moves; a hook added
    after it was cached still runs."""
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
        hook = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out))
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        assert len(seen) == 1
        layer.unmerge()
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        hook.remove()
        layer.double()
        torch.testing.assert_close(layer(x.double()).float(), adapted, rtol=1e-5, atol=1e-5)
        other = nn.Linear(12, 7).double().requires_grad_(False)
        layer.base_layer = other  # as QLoRA's merge swaps it
        expected = other(x.double()) + (adapted - base_y).double()
        if cls is LoRALinear:  # DoRA's scale depends on W0 itself
            torch.testing.assert_close(layer(x.double()), expected, rtol=1e-5, atol=1e-5)
        assert layer._plan is None or layer._plan.base in (None, other)


CHANGES = [
    ("eval", lambda m: m.eval()),
    ("merge", lambda m: m.merge()),
    ("unmerge", lambda m: m.unmerge()),
    ("disable", lambda m: setattr(m, "disabled", True)),
    ("enable", lambda m: setattr(m, "disabled", False)),
    ("set second", lambda m: m.set_adapter(["second"])),
    ("merge second", lambda m: m.merge()),
    ("set both", lambda m: m.set_adapter(["default", "second"])),
    ("set first", lambda m: m.set_adapter(["default"])),
    ("train", lambda m: m.train()),
    ("float64", lambda m: m.double()),
]
VARIANTS = {
    "lora": (LoRALinear, LoRAConfig(r=3, alpha=6)),
    "lora-dropout": (LoRALinear, LoRAConfig(r=3, alpha=6, dropout=0.2)),
    "rslora": (LoRALinear, LoRAConfig(r=4, alpha=8, use_rslora=True)),
    "dora": (DoRALinear, DoRAConfig(r=3, alpha=6)),
    "dora-norm-grad": (DoRALinear, DoRAConfig(r=3, alpha=6, detach_norm=False)),
}


def _history(layer, x) -> list:
    """Output and gradients after each state change of ``CHANGES`` (dropout reseeded)."""
    out = []
    for label, change in [("train", lambda m: m.train()), *CHANGES]:
        change(layer)
        xi = x.to(layer.base_layer.weight.dtype).detach().requires_grad_(True)
        torch.manual_seed(3)
        y = layer(xi)
        out.append((label, y, _grads(layer, xi, y)))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_and_plain_agree_through_state_changes(variant):
    """Switching the fast path off changes no output and no gradient (by more than 1e-6 of
    the tensor's largest entry, or 1e-6 below 1: float32 sums taken in another order)
    through merge, unmerge, disable, set_adapter and dtype moves, with one and two active
    adapters."""
    cls, config = VARIANTS[variant]
    layer = _layer(cls, config, bias=True)
    layer.add_adapter("second", dataclasses.replace(config, r=2))
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_()
    x = torch.randn(3, 5, 12)
    with fast_path(True):
        fast_history = _history(copy.deepcopy(layer), x)
    with fast_path(False):
        plain_history = _history(copy.deepcopy(layer), x)
    for (label, y_f, g_f), (_, y_p, g_p) in zip(fast_history, plain_history, strict=True):
        for what, a, b in [("output", y_f, y_p), *(("gradient", a, b) for a, b in zip(g_f, g_p))]:
            assert a.dtype == b.dtype and a.shape == b.shape, (label, what)
            err, size = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
            assert err <= 1e-6 * size, f"{what} after {label}: {err:.2e} apart (max |.| {size:.1f})"


@pytest.mark.parametrize("cls,config", BOTH)
def test_plain_mode_takes_no_fast_path(cls, config, monkeypatch):
    """Off, the layer computes no plan and runs no fused node, with or without a graph."""
    layer = _layer(cls, config, bias=True)
    called = _count_fused(monkeypatch)
    x = torch.randn(4, 12, requires_grad=True)
    with fast_path(False):
        assert not fast_path_enabled()
        y = layer(x)
        with torch.no_grad():
            layer(x)
        layer.merge()
        layer(x)
    assert fast_path_enabled()
    assert not called and layer._plan is None
    nodes, names = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        names.add(type(node).__name__)
        nodes += [f for f, _ in node.next_functions if f is not None]
    assert "_LoRAMatmulBackward" not in names, names
    layer.unmerge()
    layer(x)
    assert called and layer._plan is not None


def test_switch_as_call_and_context_and_environment():
    assert fast_path_enabled()
    with fast_path(False):
        assert not fast_path_enabled()
        with fast_path(True):
            assert fast_path_enabled()
        assert not fast_path_enabled()
    assert fast_path_enabled()
    try:
        fast_path(False)
        assert not fast_path_enabled()
    finally:
        fast_path(True)
    for value, enabled in (("0", False), ("off", False), ("False", False), ("1", True)):
        assert _lora_fused.enabled_in({"PEFTLAB_FAST_PATH": value}) is enabled
    assert _lora_fused.enabled_in({}) is True


def test_only_invalidate_drops_the_plan():
    """The plan is assigned in two places only: computed in ``_ready_plan``, dropped in
    ``_invalidate``; every other state change goes through ``_invalidate``."""
    where = set()
    for module in (lora, dora, qlora):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.FunctionDef):
                for sub in ast.walk(node):
                    targets = getattr(sub, "targets", None) or [getattr(sub, "target", None)]
                    if any(isinstance(t, ast.Attribute) and t.attr == "_plan" for t in targets):
                        where.add(node.name)
    assert where == {"_ready_plan", "_invalidate"}


@pytest.mark.parametrize("cls,config", BOTH)
def test_every_state_change_invalidates(cls, config, monkeypatch):
    layer = _layer(cls, config, bias=True)
    layer.add_adapter("second", dataclasses.replace(config, r=2))
    calls = []
    orig = cls._invalidate
    monkeypatch.setattr(cls, "_invalidate", lambda self: calls.append(1) or orig(self))
    changes = [
        lambda m: m.merge(),
        lambda m: m.unmerge(),
        lambda m: m.set_adapter(["second"]),
        lambda m: setattr(m, "disabled", True),
        lambda m: m.add_adapter("third", dataclasses.replace(config, r=2)),
        lambda m: m.eval(),
        lambda m: m.to(torch.float64),
        lambda m: setattr(m, "base_layer", nn.Linear(12, 7).double()),
    ]
    for change in changes:
        calls.clear()
        change(layer)
        assert calls, inspect.getsource(change).strip()


def test_unknown_global_hook_registries_mean_no_fast_path(monkeypatch):
    """Should torch rename its global hook registries, every base layer is called as a
    module: slower, never wrong."""
    layer = _layer(LoRALinear, LoRAConfig(r=3), bias=True)
    monkeypatch.setattr(_lora_fused, "_G_FWD", {0: 0})
    x = torch.randn(4, 12)
    assert layer.fused_forward(x) is None
    expected = layer.base_layer(x) + nn.functional.linear(x, layer.delta_weight("default"))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_version_key_follows_in_place_writes():
    t = torch.zeros(3)
    key = _lora_fused.version_key(t)
    assert _lora_fused.version_key(t) == key
    t.add_(1)
    assert _lora_fused.version_key(t) != key


@pytest.mark.parametrize("variant", ["dora", "lora", "rslora"])
def test_peft_parity_with_the_fast_path_off(tiny_arch, variant, batch):
    """peft's outputs and gradients, matched by the plain formulas too."""
    with fast_path(False):
        _peft_parity(tiny_arch, variant, batch)


@pytest.mark.parametrize("cls,config", BOTH)
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


@pytest.mark.parametrize("cls,config", BOTH)
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
