"""DoRA's factored norm and its gradients against a direct, fully materialised computation.

The forward tests run with the fast path on and off (the ``fast`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.methods.dora import DoRAConfig, DoRALinear
from peftlab.methods.lora import fast_path


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def fast(request):
    """Run the test with the fast path on, then off."""
    with fast_path(request.param):
        yield request.param


def _layer(detach: bool, bias: bool = True, seed: int = 0) -> DoRALinear:
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(24, 16, bias=bias))
    layer.add_adapter("default", DoRAConfig(r=4, alpha=8, detach_norm=detach))
    layer.set_adapter(["default"])
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].mul_(1.3)
    return layer


def _direct(layer: DoRALinear, x: torch.Tensor, detach: bool) -> torch.Tensor:
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    w = layer.base_layer.weight + layer.scaling["default"] * B @ A  # (out, in)
    norm = w.norm(dim=1)
    if detach:
        norm = norm.detach()
    return nn.functional.linear(x, (m / norm)[:, None] * w, layer.base_layer.bias)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_materialised_formula(detach, bias, fast):
    x = torch.randn(3, 5, 24)
    ours, ref = _layer(detach, bias), _layer(detach, bias)
    y_ours, y_ref = ours(x), _direct(ref, x, detach)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-6)
    y_ours.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    # fp32 gradients of two orderings of the same sums: both sit ~1e-5 from a float64 reference.
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(ours, name)["default"].weight.grad,
            getattr(ref, name)["default"].weight.grad,
            rtol=1e-4,
            atol=1e-5,
        )
    torch.testing.assert_close(
        ours.lora_magnitude_vector["default"].grad,
        ref.lora_magnitude_vector["default"].grad,
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_inference_forward_matches_formula(bias, dropout, fast):
    """Without a graph the rescale runs in place; the result must not change."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(24, 16, bias=bias))
    layer.add_adapter("default", DoRAConfig(r=4, alpha=8, dropout=dropout))
    layer.set_adapter(["default"])
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    layer.eval()
    version = layer.base_layer.bias._version if bias else None
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = _direct(layer, x, True)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    if bias:  # the bias itself is never written to
        assert layer.base_layer.bias._version == version


def test_norm_cache_follows_in_place_weight_changes():
    layer = _layer(True)
    before = layer.weight_norm("default").clone()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
    after = layer.weight_norm("default")
    w = (
        layer.base_layer.weight
        + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(after, w.norm(dim=1))
    assert not torch.allclose(before, after)


def test_merge_unmerge_round_trip_restores_w0(fast):
    layer = _layer(True)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 24)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_training_dropout_matches_formula(detach, fast):
    """With dropout in training the update sees dropout(x) and so does W0 inside the scale:
    ``(m/‖W‖)·(W0 + sBA)·dropout(x) + W0·(x - dropout(x)) + b`` (peft's formula)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(24, 16))
    layer.add_adapter("default", DoRAConfig(r=4, alpha=8, dropout=0.3, detach_norm=detach))
    layer.set_adapter(["default"])
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    layer.train()
    x = torch.randn(3, 5, 24)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = layer.lora_dropout["default"](x)
    w0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = _direct(layer, xd, detach) - b + nn.functional.linear(x - xd, w0, b)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_norm_cache_is_dropped_on_invalidate():
    """The norm caches are derived state: merge, dtype moves and adapter changes drop them
    with the plan, so a stale norm can never outlive the state it came from."""
    layer = _layer(True).eval()
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert layer._norm_cache and layer._w0_cache is not None
    layer.merge()
    assert not layer._norm_cache and layer._w0_cache is None
