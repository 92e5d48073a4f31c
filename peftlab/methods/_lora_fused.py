"""The LoRA fast path: a per-layer plan, one fused autograd node, and the switch that turns both off.

A :class:`~peftlab.methods.lora.LoRALinear` (and DoRA on top of it) computes the same sum
two ways:

* **plain** — the composed formula, every module called as a module:
  ``base_layer(x) + s·B·A·dropout(x)`` (DoRA: its own formula, see ``dora.py``);
* **fast** — a :class:`Plan` cached per layer says whether the layer can skip the module
  machinery: ``BASE`` (adapters disabled, merged or none active) calls ``F.linear`` on the
  base weight directly; ``FUSED`` (one active adapter on a plain ``nn.Linear``) runs
  :class:`_LoRAMatmul`, one node for ``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ``; ``GENERAL`` calls the base
  layer and adds each update with one ``addmm``. Layers that share their input (q/k/v,
  gate/up) take ``x·Aᵀ`` from one grouped product (:mod:`peftlab.methods._lora_group`) and
  run :class:`_LoRAProjected` (or the ``addmm``) on it.

The fast path is on unless the environment sets ``PEFTLAB_FAST_PATH=0`` (read at import), or
:func:`fast_path` turns it off — for bisecting a wrong number down to, or away from, it:

    with peftlab.methods.lora.fast_path(False):
        loss_plain = model(**batch).loss

Two pieces of private torch state are read here, each in one function that says why and
what happens if torch changes it: :func:`calls_forward_directly` (torch's global module hook
registries) and :func:`version_key` (a tensor's in-place write counter).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn


def enabled_in(environ, key: str = "PEFTLAB_FAST_PATH", default: str = "1") -> bool:
    """``environ[key]`` (``default`` when unset) as a switch: off for 0, false, off or no;
    else on."""
    return environ.get(key, default).strip().lower() not in ("0", "false", "off", "no")


ENABLED: bool = enabled_in(os.environ)
"""Whether adapter layers take the fast path; read per call, set by :func:`fast_path`."""


class fast_path:  # noqa: N801 (used like a function: fast_path(False), with fast_path(False))
    """Turn the LoRA/DoRA fast path on or off, for the process or for a ``with`` block.

    ``fast_path(False)`` switches it off until switched back; ``with fast_path(False):``
    switches it off inside the block and restores the previous setting on exit. Off, every
    adapter layer computes the plain formula (no plan, no fused node, no in-place tricks).

    Args:
        enabled: True for the fast path (the default at import), False for the plain formula.
    """

    def __init__(self, enabled: bool) -> None:
        global ENABLED
        self.previous = ENABLED
        ENABLED = bool(enabled)

    def __enter__(self) -> fast_path:
        return self

    def __exit__(self, *exc) -> None:
        global ENABLED
        ENABLED = self.previous


def fast_path_enabled() -> bool:
    """Whether adapter layers currently take the fast path."""
    return ENABLED


FUSED, BASE, GENERAL = "fused", "base", "general"


class Plan(NamedTuple):
    """What a layer's forward does, decided once and cached until :meth:`_invalidate`.

    Modules (not their parameters) are held: a parameter replaced on them, or its ``.data``
    swapped (``prepare_for_kbit_training``), is read afresh on every call.
    """

    kind: str
    """``FUSED``, ``BASE`` or ``GENERAL`` (see the module docstring)."""
    base: nn.Module | None = None
    """The base ``nn.Linear`` whose weight the fast path reads (``BASE``, ``FUSED``)."""
    name: str | None = None
    """The one active adapter (``FUSED``)."""
    lora_a: nn.Module | None = None
    lora_b: nn.Module | None = None
    scale: float = 0.0
    """s = alpha / r (or alpha / √r) of the active adapter (``FUSED``)."""
    device_type: str = "cpu"
    """Device type of the base weight, for the autocast test (``FUSED``)."""


GENERAL_PLAN = Plan(GENERAL)


def lora_matmul(x, w0, bias, A, B, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ, x·Aᵀ)`` with ``x`` flattened to ``(N, in)``: three BLAS
    calls, the update added in place into the base output."""
    x2 = x.reshape(-1, x.shape[-1])
    ax = nn.functional.linear(x2, A)  # (N, r)
    y = nn.functional.linear(x2, w0, bias)
    return y.addmm_(ax, B.t(), alpha=s), ax


class _LoRAMatmul(torch.autograd.Function):
    """``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ`` for a frozen dense ``W0`` (``[out, in]``), as one autograd node.

    Autograd's own graph for the same sum has six nodes per layer, adds the two input
    gradients (W0's and A's paths) in a separate pass and leaves B's gradient transposed.
    Here the forward is one ``addmm`` into the base output, and the backward is four matmuls
    and one in-place ``addmm_``: ∂x = g·W0 + (s·g·B)·A, ∂A = (s·g·B)ᵀ·x, ∂B = s·gᵀ·(x·Aᵀ).
    Saved for backward: x (which A's gradient needs anyway) and x·Aᵀ (``(N, r)``).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A, B, s):
        y, ax = lora_matmul(x, w0, bias, A, B, s)
        ctx.save_for_backward(x, w0, A, B, ax)
        ctx.s = s
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, w0, A, B, ax = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        g = gy.reshape(-1, gy.shape[-1])
        gx = gA = gB = None
        if need_B:
            gB = (g.t() @ ax).mul_(ctx.s)  # (out, r)
        if need_x or need_A:
            gax = (g @ B).mul_(ctx.s)  # (N, r)
            if need_A:
                gA = gax.t() @ x.reshape(-1, x.shape[-1])  # (r, in)
            if need_x:
                gx = (g @ w0).addmm_(gax, A).view(x.shape)
        return gx, None, None, gA, gB, None


def fused(x, w0, b, A, B, s: float) -> torch.Tensor:
    """``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ``: through :class:`_LoRAMatmul` when autograd records, else
    the same three matmuls without a graph node."""
    if not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)):
        y = lora_matmul(x, w0, b, A, B, s)[0]
        return y.view(*x.shape[:-1], y.shape[-1])
    return _LoRAMatmul.apply(x, w0, b, A, B, s)


def projected_matmul(x, w0, bias, ax, B, s: float) -> torch.Tensor:
    """``x·W0ᵀ + b + s·P·Bᵀ`` as ``(N, out)`` for a given ``P = x·Aᵀ`` (``(N, r)``, a
    column block of a grouped product, see :mod:`peftlab.methods._lora_group`): two BLAS
    calls, the update added in place into the base output."""
    y = nn.functional.linear(x.reshape(-1, x.shape[-1]), w0, bias)
    return y.addmm_(ax.reshape(-1, ax.shape[-1]), B.t(), alpha=s)


class _LoRAProjected(torch.autograd.Function):
    """:class:`_LoRAMatmul` with ``P = x·Aᵀ`` computed outside, as one input: the node of a
    layer whose A product is a block of its group's one wide product.

    Backward: ∂x = g·W0 (the A path's share reaches x through the group's product),
    ∂P = s·g·B, ∂B = s·gᵀ·P. Saved: W0, B and P — not x, which the group's product keeps.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, ax, B, s):
        y = projected_matmul(x, w0, bias, ax, B, s)
        ctx.save_for_backward(w0, B, ax)
        ctx.s, ctx.x_shape = s, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        w0, B, ax = ctx.saved_tensors
        need_x, _, _, need_ax, need_B, _ = ctx.needs_input_grad
        g = gy.reshape(-1, gy.shape[-1])
        gx = gax = gB = None
        if need_B:
            gB = (g.t() @ ax.reshape(-1, ax.shape[-1])).mul_(ctx.s)  # (out, r)
        if need_ax:
            gax = (g @ B).mul_(ctx.s).view(ax.shape)  # (N, r)
        if need_x:
            gx = (g @ w0).view(ctx.x_shape)
        return gx, None, None, gax, gB, None


def fused_projected(x, w0, b, ax, B, s: float) -> torch.Tensor:
    """``x·W0ᵀ + b + s·P·Bᵀ``: through :class:`_LoRAProjected` when autograd records, else
    the same two matmuls without a graph node."""
    if not (torch.is_grad_enabled() and (x.requires_grad or ax.requires_grad or B.requires_grad)):
        y = projected_matmul(x, w0, b, ax, B, s)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _LoRAProjected.apply(x, w0, b, ax, B, s)


# torch's registries of global module hooks (``torch.nn.modules.register_module_*_hook``):
# dicts filled in place, never rebound, and without a public reader. Should a torch release
# rename one, it is None here and ``calls_forward_directly`` answers False for every module:
# the fast path then always calls the base layer as a module (slower, never wrong).
_GLOBAL_REGISTRIES = tuple(
    getattr(nn.modules.module, name, None)
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)
_GLOBALS_KNOWN = all(isinstance(r, dict) for r in _GLOBAL_REGISTRIES)
_G_FWD, _G_PRE, _G_BWD, _G_BWD_PRE = _GLOBAL_REGISTRIES if _GLOBALS_KNOWN else ({0: 0},) * 4


def calls_forward_directly(module: nn.Module) -> bool:
    """Whether calling ``module`` would run its class's ``forward`` and nothing else, so that
    the fast path may read its weight and compute that ``forward`` itself.

    This is the test ``nn.Module._call_impl`` makes before skipping all hook machinery: no
    forward or backward hooks on the module (its own dicts, filled by the public
    ``register_*_hook`` methods) nor registered globally (torch's private registries, read
    because nothing public exposes them), plus no ``forward`` replaced on the instance
    (accelerate's offloading wraps it to put the weights in place). Hooks may be added at any
    time behind the layer's back, so this runs on every call: eight truthiness tests.
    """
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _G_FWD
        or _G_PRE
        or _G_BWD
        or _G_BWD_PRE
        or "forward" in module.__dict__
    )


def version_key(t: torch.Tensor) -> object:
    """``(storage address, in-place write count)`` of ``t``: equal keys mean unchanged values.

    ``Tensor._version`` is torch's counter of in-place writes (autograd's check that a saved
    tensor was not modified). Caches of values derived from parameters (DoRA's row norms,
    a group's stacked A factors) and of a layer input's products (``_lora_group``) use it
    as a guard because an optimizer step writes A and B in place without telling the
    layer; the known mutation paths (merge, unmerge, adapter and dtype/device changes) reset
    those caches through ``_invalidate`` anyway. Should torch drop the attribute, the key is
    a fresh object that equals nothing: every call recomputes (slower, never stale).
    """
    try:
        return t.data_ptr(), t._version
    except (AttributeError, RuntimeError):  # RuntimeError: a tensor without storage
        return object()
