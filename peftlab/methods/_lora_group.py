"""Grouped A products: LoRA layers that read one input share one wide matmul.

Layers called on the very same tensor ``x`` — q/k/v in attention, gate/up in a gated MLP —
each start their update with ``x·Aᵀ`` (``A ∈ R^{r×in}``, ranks may differ). Stacking the
factors of the n layers (and of every active adapter on each),

    x·[A_1; A_2; …; A_n]ᵀ = [x·A_1ᵀ | x·A_2ᵀ | … | x·A_nᵀ]      ((N, in)·(in, Σr) → (N, Σr))

column block i of one wide product is layer i's own product: each entry is the same dot
product of a row of x with a row of A_i, only summed by a kernel tiled for Σr columns
instead of r (float32 differences ~1e-7 relative). Autograd's graph of ``cat → linear →
split`` gives the backward as one product each as well: ∂[A_1; …; A_n] = ∂Pᵀ·x and the A
path's share of ∂x = ∂P·[A_1; …; A_n], where ∂P = [∂P_1 | … | ∂P_n] is gathered by the
split's one node. One pass over x (``(N, in)``) instead of n, forward and backward. Each
layer then adds ``s·P_i·B_iᵀ`` to its base output (:func:`~peftlab.methods._lora_fused.
fused_projected`, or one ``addmm`` on the general path).

**When it applies.** Groups are fixed when adapters are applied (:func:`link`): LoRA layers
that are children of one module and whose names form one :data:`FAMILIES` entry (``q_proj``,
``k_proj``, ``v_proj`` under one attention module; ``gate_proj``, ``up_proj`` under one
MLP; …). Fixed, not learned from a forward, because a checkpointed layer must save the same
tensors when recomputed as in its forward (``torch.utils.checkpoint`` checks it): a grouping
learned between the two would change them. At run time the first member called *leads*: it
computes the product for every member and adapter that can use it now — the layer's adapters
on, not merged, each adapter's dropout the identity (0, or eval mode: a shared mask would
change peft's semantics, where each adapter draws its own), the leader's A dtype and device
— keeps its own block and leaves the others in the group. A member takes its block only if
its input is *the very same tensor object* (identity), unwritten since (``version_key``),
under the same grad and autocast modes, and its A is the same, unwritten parameter; anything
else — a different input (T5's cross-attention k/v), an adapter switched since, a layer called
twice on one input — computes its own product, ungrouped (or leads a new product). The
blocks are dropped once all are taken, by any state change of a member (``_invalidate``),
and never pickled or copied; an untaken block (a member the model did not call) lives only
until the group's next lead. The stacked ``[A_1; …; A_n]`` is a fresh ``cat`` in each
forward that trains A; without a graph (generation) it is kept while every A is unwritten
(version counter), unmoved and unreplaced: a copy of the group's A factors in memory. GPT-2's
fused ``c_attn`` has no sibling: nothing to group.

Grouping is part of the LoRA fast path (off with it: ``fast_path(False)``,
``PEFTLAB_FAST_PATH=0``) and has its own switch, **off by default** until a benchmark shows
it pays: ``grouping(True)`` or ``PEFTLAB_LORA_GROUP=1`` turns it on. Not yet shown: on the
CPU one (N, in)·(in, 3r) product was not clearly cheaper than three (N, in)·(in, r) ones at
64–128 tokens, the bookkeeping costs ~25–30 µs per call, and the stacked ``[A_1; …; A_n]``
is one more tensor saved for backward (tiny Llama: 0.323 vs 0.295 MB saved, more than
peft's LoRA).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from peftlab.methods._lora_fused import enabled_in, version_key

ENABLED: bool = enabled_in(os.environ, "PEFTLAB_LORA_GROUP", default="0")
"""Whether grouped layers share their A product; read per call, set by :func:`grouping`."""

FAMILIES: tuple[frozenset[str], ...] = tuple(
    frozenset(names)
    for names in (
        ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, …
        ("gate_proj", "up_proj"),  # gated MLPs (Llama, Mistral, Qwen, Gemma)
        ("query", "key", "value"),  # BERT, RoBERTa, ViT
        ("q", "k", "v"),  # T5
        ("q_lin", "k_lin", "v_lin"),  # DistilBERT
        ("wq", "wk", "wv"),
        ("w1", "w3"),  # Mixtral experts
    )
)
"""Names of sibling layers that a model calls on one input (checked again on every call)."""


class grouping:  # noqa: N801 (used like a function: grouping(False), with grouping(False))
    """Turn grouped A products on or off, for the process or for a ``with`` block (as
    :class:`~peftlab.methods._lora_fused.fast_path`); off, each layer computes its own.

    Args:
        enabled: True to group, False (the default at import) for one product per layer.
    """

    def __init__(self, enabled: bool) -> None:
        global ENABLED
        self.previous = ENABLED
        ENABLED = bool(enabled)

    def __enter__(self) -> grouping:
        return self

    def __exit__(self, *exc) -> None:
        global ENABLED
        ENABLED = self.previous


def grouping_enabled() -> bool:
    """Whether grouped layers currently share their A product."""
    return ENABLED


def _mode(x: torch.Tensor) -> tuple[bool, bool]:
    """The modes a block was computed under that change what it is: grad recording (a block
    without a graph would cut A's gradient) and autocast (its dtype)."""
    return torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type)


class _Pending(NamedTuple):
    """The blocks the leader left for the other members, and what they are valid for."""

    x: weakref.ref
    version: object  # version_key(x)
    mode: tuple[bool, bool]
    blocks: dict  # (layer, adapter) -> (A, version_key(A), x·Aᵀ block)


class Group:
    """LoRA layers called on one input: the first one called computes all their A products.

    Members are held strongly (they are siblings in one model anyway); a pickled or copied
    group keeps its members and drops any pending blocks.
    """

    def __init__(self, members: Iterable[nn.Module]) -> None:
        self.members = tuple(members)
        self._pending: _Pending | None = None
        self._entries: list[tuple[nn.Module, str, nn.Module]] | None = None
        self._stacked: tuple[tuple, torch.Tensor, list] | None = None

    def __getstate__(self) -> dict:
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.members = state["members"]
        self.clear()

    def clear(self) -> None:
        """Drop the pending blocks, the adapters that may share and the stacked factors:
        called by every member's ``_invalidate`` (any change of what they depend on)."""
        self._pending = None
        self._entries = None
        self._stacked = None

    def _stack(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """``[A_1; …; A_n]`` (``(Σr, in)``). Recorded by autograd when A is trained (a fresh
        ``cat`` each forward: the optimizer rewrites A every step anyway); otherwise —
        generation — kept until an A is rewritten, moved or replaced (a copy of the group's
        A factors, instead of one ``cat`` per decoded token)."""
        if torch.is_grad_enabled() and any(A.requires_grad for A in factors):
            return torch.cat(factors)
        key = tuple((id(A), version_key(A), A.dtype) for A in factors)
        hit = self._stacked
        if hit is None or hit[0] != key:  # the factors are held: their ids stay theirs
            hit = self._stacked = (key, torch.cat(factors), factors)
        return hit[1]

    def take(self, layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``x·Aᵀ`` (``(N, r)``, x's leading dims flattened) of ``layer``'s adapter ``name``: its block of the product
        the leader left if valid for this very call, else of a new product this call leads;
        ``None`` when nothing is shared (the caller computes its own)."""
        p = self._pending
        if p is not None and p.x() is x and p.version == version_key(x) and p.mode == _mode(x):
            hit = p.blocks.pop((layer, name), None)
            if hit is not None:
                if not p.blocks:
                    self._pending = None
                A, version, block = hit
                if layer.lora_A[name]._parameters["weight"] is A and version_key(A) == version:
                    return block
                return None
        return self._lead(layer, x, name)

    def _lead(self, layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """Compute ``x·[A_1; …; A_n]ᵀ`` for every member and adapter that can use it now;
        keep ``layer``'s block, leave the others pending."""
        if self._entries is None:  # (member, adapter, its lora_A module), until clear()
            self._entries = [(m, n, m.lora_A[n]) for m in self.members for n in m._group_names()]
        factors = {(m, n): a._parameters["weight"] for m, n, a in self._entries}
        own = factors.get((layer, name))
        if own is None:
            return None
        factors = {
            k: A
            for k, A in factors.items()
            if A.dtype == own.dtype and A.device == own.device and A.shape[1] == own.shape[1]
        }
        x_key = version_key(x)
        if len(factors) < 2 or not isinstance(x_key, tuple):  # an unknowable version: alone
            return None
        stacked = self._stack(list(factors.values()))  # (Σr, in)
        xa = x.reshape(-1, x.shape[-1])  # (N, in): a 3-d input measured slower on CPU
        xa = xa if xa.dtype == own.dtype else xa.to(own.dtype)
        product = nn.functional.linear(xa, stacked)  # (N, Σr)
        blocks = product.split([A.shape[0] for A in factors.values()], dim=-1)
        pending = {k: (A, version_key(A), b) for (k, A), b in zip(factors.items(), blocks)}
        mine = pending.pop((layer, name))[2]
        self._pending = _Pending(weakref.ref(x), x_key, _mode(x), pending)
        return mine


def link(layers: Iterable[tuple[str, nn.Module]], families=FAMILIES) -> int:
    """Give every layer of ``layers`` (``(qualified name, LoRA layer)`` pairs, a whole model's)
    its :class:`Group` — siblings under one parent whose names form one of ``families`` — or
    ``None``. Replaces any earlier grouping. Returns the number of groups."""
    by_key: dict[tuple[str, int], list[nn.Module]] = {}
    for qualified, layer in layers:
        layer._group = None
        parent, _, local = qualified.rpartition(".")
        family = next((i for i, f in enumerate(families) if local in f), None)
        if family is not None:
            by_key.setdefault((parent, family), []).append(layer)
    groups = [Group(members) for members in by_key.values() if len(members) > 1]
    for group in groups:
        for layer in group.members:
            layer._group = group
    return len(groups)
