"""Grouped A products (peftlab.methods._lora_group): q/k/v and gate/up share one x·[A…]ᵀ.

Grouped, ungrouped (``grouping(False)``) and plain (``fast_path(False)``) runs must give the
same outputs and gradients, and the grouped run must actually run fewer matrix products.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.methods import _lora_fused, _lora_group
from peftlab.methods.lora import (
    LoRAConfig,
    LoRALinear,
    add_low_rank_adapters,
    fast_path,
    grouping,
    grouping_enabled,
)
from peftlab.train import checkpointing
from tests.conftest import tiny_gpt2, tiny_llama

ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _grouping_on():
    """Grouping is off by default (until measured to pay); these tests are about it."""
    with grouping(True):
        yield


MODES = {
    "ungrouped": lambda: grouping(False),
    "plain": lambda: fast_path(False),
}
_MM = {"mm", "addmm", "addmm_", "bmm", "matmul"}


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products torch runs (after autograd: forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _MM:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _lora_layers(model) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _randomize_b(model, seed: int = 5) -> None:
    """B = 0 at init would hide every gradient of A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _model(arch: str, method: str, r: int = 4, dropout: float = 0.0):
    model = ARCHS[arch]()
    config = {"method": method, "r": r, "alpha": 2 * r, "dropout": dropout}
    peftlab.apply(model, peftlab.config_from_dict({**config, "target_modules": "all-linear"}))
    _randomize_b(model)
    return model.train()


def _second_adapter(model, method: str) -> None:
    config = {"method": method, "r": 3, "alpha": 5, "target_modules": "all-linear"}
    peftlab.apply(model, peftlab.config_from_dict(config), adapter_name="second")
    _randomize_b(model, seed=6)
    for _, layer in _lora_layers(model):
        layer.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


def _sibling(model, arch: str) -> LoRALinear:
    name = "model.layers.0.self_attn.k_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    return model.get_submodule(name)


def _ranks_differ(model, arch: str, method: str) -> None:
    """A rank per layer: k (and the MLP's up) get r = 2, the others keep r = 4."""
    from peftlab.methods.dora import DoRAConfig

    cfg = (DoRAConfig if method == "dora" else LoRAConfig)(r=2, alpha=3)
    for name, layer in _lora_layers(model):
        if name.endswith(("k_proj", "up_proj", "c_fc")):
            layer.add_adapter("default", cfg)
    _randomize_b(model, seed=7)


SCENARIOS = {
    "train": lambda model, arch, method: None,
    "checkpointing": lambda model, arch, method: checkpointing.enable(model, True),
    "two-adapters": lambda model, arch, method: _second_adapter(model, method),
    "sibling-disabled": lambda model, arch, method: setattr(
        _sibling(model, arch), "disabled", True
    ),
    "sibling-merged": lambda model, arch, method: _sibling(model, arch).merge(),
    "ranks-differ": _ranks_differ,
}


def _step(model, ids, mode=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradients of every trainable parameter, under ``mode``."""
    model.zero_grad(set_to_none=True)
    with MODES[mode]() if mode else contextlib.nullcontext():
        torch.manual_seed(11)  # dropout masks, if any, drawn alike
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_same(a, b, what: str) -> None:
    """Equal within float32 sums taken in another order: 1e-6 of the largest entry (or
    1e-6 below 1; seen: 1.3e-7)."""
    (ya, ga), (yb, gb) = a, b
    assert ga.keys() == gb.keys(), what
    for key, x, y in [("logits", ya, yb), *((k, ga[k], gb[k]) for k in ga)]:
        err, size = (x - y).abs().max().item(), max(1.0, y.abs().max().item())
        assert err <= 1e-6 * size, f"{what}: {key} {err:.2e} apart (max |.| {size:.2f})"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_grouped_equals_ungrouped_and_plain(arch, method, scenario, batch):
    model = _model(arch, method)
    SCENARIOS[scenario](model, arch, method)
    grouped = _step(model, batch)
    for mode in MODES:
        _assert_same(grouped, _step(model, batch, mode), f"grouped vs {mode}")


def _forward_matmuls(model, ids, mode=None, backward: bool = False) -> int:
    """Matmuls of a forward (and backward), counted after one uncounted forward (which
    fills caches: DoRA's weight norms)."""
    with MODES[mode]() if mode else contextlib.nullcontext():
        with torch.no_grad():
            model(input_ids=ids)
        with _CountMatmuls() as count:
            if backward:
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids)
    return count.n


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama_groups_qkv_and_gate_up_into_fewer_matmuls(method, batch):
    """Per decoder layer q/k/v's three A products become one (2 fewer) and gate/up's two
    become one (1 fewer): 3 fewer matmuls per layer in the forward; fewer in backward too."""
    model = _model("llama", method)
    groups = {id(m._group) for _, m in _lora_layers(model) if m._group is not None}
    n_layers = model.config.num_hidden_layers
    assert len(groups) == 2 * n_layers
    fewer = _forward_matmuls(model, batch, "ungrouped") - _forward_matmuls(model, batch)
    assert fewer == 3 * n_layers
    fwd_bwd = _forward_matmuls(model, batch, "ungrouped", True) - _forward_matmuls(
        model, batch, backward=True
    )
    assert fwd_bwd > fewer
    with fast_path(False):  # off with the fast path
        assert _forward_matmuls(model, batch) == _forward_matmuls(model, batch, "ungrouped")


def test_gpt2_has_nothing_to_group(batch):
    model = _model("gpt2", "lora")
    assert all(m._group is None for _, m in _lora_layers(model))
    assert _forward_matmuls(model, batch) == _forward_matmuls(model, batch, "ungrouped")


def test_no_block_outlives_the_forward(batch):
    """Every block the leaders left is taken within the forward: nothing held after it."""
    model = _model("llama", "lora")
    model(input_ids=batch).logits.sum().backward()
    with torch.no_grad():
        model(input_ids=batch)
    assert all(m._group._pending is None for _, m in _lora_layers(model) if m._group is not None)


def test_dropout_in_training_is_not_grouped_but_eval_is(batch):
    """A shared dropout mask would change the semantics: with dropout in training each layer
    draws its own and computes its own product; in eval dropout is the identity: grouped."""
    model = _model("llama", "lora", dropout=0.1)
    assert _forward_matmuls(model, batch) == _forward_matmuls(model, batch, "ungrouped")
    _assert_same(_step(model, batch), _step(model, batch, "ungrouped"), "dropout in training")
    model.eval()
    assert _forward_matmuls(model, batch) < _forward_matmuls(model, batch, "ungrouped")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)


def _attention() -> _Attention:
    torch.manual_seed(0)
    attn = _Attention().requires_grad_(False)
    config = LoRAConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"])
    add_low_rank_adapters(attn, config, "default", LoRALinear)
    for _, layer in _lora_layers(attn):
        layer.set_adapter(["default"])
    _randomize_b(attn)
    return attn


def _reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    with fast_path(False):
        return layer(x)


def test_a_different_or_rewritten_input_computes_its_own_product():
    attn = _attention()
    x = torch.randn(3, 8)
    attn.q_proj(x)  # leads: blocks for k and v pending on x
    assert set(attn.q_proj._group._pending.blocks) == {
        (attn.k_proj, "default"),
        (attn.v_proj, "default"),
    }
    other = torch.randn(3, 8)  # k on another input: the block pending on x would be wrong
    torch.testing.assert_close(attn.k_proj(other), _reference(attn.k_proj, other))
    attn.q_proj(x)
    with torch.no_grad():
        x.add_(1.0)  # same object, new values: the version counter moved
    torch.testing.assert_close(attn.v_proj(x), _reference(attn.v_proj, x))


def test_a_block_without_a_graph_is_not_taken_by_a_recording_call():
    attn = _attention()
    x = torch.randn(3, 8)
    with torch.no_grad():
        attn.q_proj(x)
    attn.k_proj(x).sum().backward()
    assert attn.k_proj.lora_A["default"].weight.grad is not None


def test_a_state_change_drops_the_pending_blocks():
    attn = _attention()
    x = torch.randn(3, 8)
    attn.q_proj(x)
    assert attn.q_proj._group._pending is not None
    attn.k_proj.double()
    assert attn.q_proj._group._pending is None
    y = attn.k_proj(x.double())
    torch.testing.assert_close(y, _reference(attn.k_proj, x.double()))


def test_stacked_factors_follow_in_place_writes_and_moves():
    """Without a graph the stacked [A_q; A_k; A_v] is kept between calls: an optimizer-like
    in-place write of A, or a dtype move, must not leave it stale."""
    attn = _attention().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        attn.k_proj.lora_A["default"].weight.add_(0.5)
        attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(x), _reference(attn.k_proj, x))
        attn.double()
        xd = x.double()
        attn.q_proj(xd)
        torch.testing.assert_close(attn.v_proj(xd), _reference(attn.v_proj, xd))


def test_copies_and_pickles_keep_their_own_groups(batch):
    model = _model("llama", "lora")
    clone = copy.deepcopy(model)
    for (_, a), (_, b) in zip(_lora_layers(model), _lora_layers(clone), strict=True):
        assert (a._group is None) == (b._group is None)
        if a._group is not None:
            assert b in b._group.members and a not in b._group.members
    restored = pickle.loads(pickle.dumps(model))
    _assert_same(_step(model, batch), _step(restored, batch), "pickled")


def test_qlora_4bit_base_is_grouped_exactly(batch):
    from peftlab.methods.qlora import QLoRAConfig

    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4)).train()
    _randomize_b(model)
    assert _forward_matmuls(model, batch) < _forward_matmuls(model, batch, "ungrouped")
    _assert_same(_step(model, batch), _step(model, batch, "ungrouped"), "qlora")


def test_16_bit_base_under_float32_adapters(batch):
    """The general path's mixed dtypes: a bfloat16 base, float32 A and B."""
    model = _model("llama", "lora").to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    assert _forward_matmuls(model, batch) < _forward_matmuls(model, batch, "ungrouped")
    (ya, ga), (yb, gb) = _step(model, batch), _step(model, batch, "ungrouped")
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=2e-2, atol=2e-2)


def test_grouped_under_autocast_matches_ungrouped(batch):
    model = _model("llama", "lora")
    results = []
    for mode in (None, "ungrouped"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(model, batch, mode))
    (ya, ga), (yb, gb) = results
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=3e-2, atol=3e-2)


def test_switch_as_call_and_context_and_environment():
    assert grouping_enabled()
    with grouping(False):
        assert not grouping_enabled()
    assert grouping_enabled()
    assert _lora_fused.enabled_in({"PEFTLAB_LORA_GROUP": "0"}, "PEFTLAB_LORA_GROUP") is False
    assert _lora_fused.enabled_in({}, "PEFTLAB_LORA_GROUP") is True
    assert _lora_fused.enabled_in({}, "PEFTLAB_LORA_GROUP", default="0") is False
    assert _lora_fused.enabled_in({"PEFTLAB_LORA_GROUP": "1"}, "PEFTLAB_LORA_GROUP", "0")


def test_grouping_is_off_by_default_in_a_fresh_process():
    """Off until a benchmark shows it pays (peftlab/methods/_lora_group.py)."""
    import subprocess
    import sys

    code = "from peftlab.methods.lora import grouping_enabled as g; print(g())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PEFTLAB_LORA_GROUP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr[-500:]


def test_link_groups_siblings_by_family_only():
    layers = {name: LoRALinear(nn.Linear(4, 4)) for name in ("q_proj", "k_proj", "o_proj")}
    named = [(f"a.{n}", m) for n, m in layers.items()]
    named.append(("b.q_proj", LoRALinear(nn.Linear(4, 4))))  # another parent
    assert _lora_group.link(named) == 1
    assert layers["q_proj"]._group is layers["k_proj"]._group is not None
    assert layers["o_proj"]._group is None and named[-1][1]._group is None


def test_a_decode_step_is_not_grouped():
    """Without a graph, fewer than MIN_GROUP_ROWS token rows (a decode step) compute their
    own A products: the group's bookkeeping would cost more than it saves."""
    from peftlab.methods.lora import MIN_GROUP_ROWS

    model = _model("llama", "lora")
    one = torch.randint(0, 128, (2, 1))
    assert MIN_GROUP_ROWS > 2
    assert _forward_matmuls(model, one) == _forward_matmuls(model, one, "ungrouped")
