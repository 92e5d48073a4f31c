"""Mixed batches: every row of a batch through its own adapter (or none), in one forward.

Serving several adapters on one base model, a batch holds requests for different adapters.
Within :func:`adapter_rows` row ``i`` of every batch the model sees uses adapter
``names[i]`` (``None``: the base model). Every layer that is not adapted computes the whole
batch at once, as without adapters; each LoRA-family layer (LoRA, rsLoRA, DoRA, QLoRA, QDoRA)
splits the batch by adapter, computes each group of rows with only that adapter on, and puts
the rows back in order:

    y[rows(n)] = layer_n(x[rows(n)])     for each adapter n among the names (and the base),

so a row's output is the output it gets alone with its adapter active — exactly, in float
terms, where the batch computation does not mix rows (every layer of a transformer but
attention across padding, and batch-norm, which these models do not have). The cost is one
call of the adapted layer per distinct adapter, on that adapter's rows only.

With ``model.generate`` inside the block, every step keeps the rows in order (greedy or
sampling; beam search multiplies the rows and is refused by the batch-size check). What is
refused, with a one-line error and the model unchanged: a name the model does not hold, a
name of a method that is not LoRA-family (prefix and prompt tuning change the sequence, IA³
and adapters are not per-row here), merged adapters (unmerge first), adapters that train
modules in full (a classification head each: the rows would need different heads), and a
batch whose size is not ``len(names)``. Grouped A products (:mod:`peftlab.methods._lora_group`)
are off inside the block: the row groups are different tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.model import adapter_configs, adapter_layers
from peftlab.core.state import active_adapters, saved_modules
from peftlab.methods import _lora_group
from peftlab.methods._lora_init import residual_adapters
from peftlab.methods.lora import LoRAConfig, LoRALinear

BASE = None
"""The name that puts a row through the base model (no adapter)."""


class Rows:
    """Which rows of a batch go through which adapter: ``groups`` of (name, row indices)."""

    def __init__(self, names: Sequence[str | None]):
        self.size = len(names)
        order: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            order.setdefault(n, []).append(i)
        self.groups = [(n, torch.tensor(ix)) for n, ix in order.items()]

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """``layer`` on ``x`` (rows first), each group of rows with its own adapter alone."""
        if x.dim() < 2 or x.shape[0] != self.size:
            raise ConfigError(
                f"adapter_rows: a batch of {x.shape[0] if x.dim() else 0} rows reached "
                f"{type(layer).__name__}, but {self.size} adapter names were given (one per "
                f"row; beam search and other row-multiplying calls are not supported)"
            )
        active, disabled = layer.active, layer.disabled
        out: torch.Tensor | None = None
        del layer.__dict__["_rows"]  # the layer's own forward, per group, below
        try:
            for name, idx in self.groups:
                idx = idx.to(x.device)
                if name is BASE or name not in layer.lora_A:
                    layer.disabled = True  # the base layer only (an untargeted layer too)
                else:
                    layer.disabled, layer.active = False, [name]
                y = layer(x.index_select(0, idx))
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out.index_copy_(0, idx, y)
        finally:
            layer.active, layer.disabled = active, disabled
            layer.__dict__["_rows"] = self
        assert out is not None
        return out


def _check(model: nn.Module, names: Sequence[str | None]) -> None:
    configs = adapter_configs(model)
    if not names:
        raise ConfigError("adapter_rows: give one adapter name (or None for the base) per row")
    for n in dict.fromkeys(names):
        if n is BASE:
            continue
        if n not in configs:
            raise ConfigError(
                f"adapter_rows: no adapter named {n!r}; the model has {sorted(configs)} "
                f"(None: the base model)"
            )
        if not isinstance(configs[n], LoRAConfig):
            raise ConfigError(
                f"adapter_rows: adapter {n!r} is {configs[n].method}; mixed batches take LoRA-family "
                f"adapters (lora, dora, qlora) only"
            )
        if saved_modules(model, n):
            raise ConfigError(
                f"adapter_rows: adapter {n!r} trains {saved_modules(model, n)} in full; rows "
                f"of different adapters would need different copies of them"
            )
    others = [n for n in active_adapters(model) if not isinstance(configs[n], LoRAConfig)]
    if others:
        raise ConfigError(
            f"adapter_rows: adapter {others[0]!r} ({configs[others[0]].method}) is active and "
            f"would apply to every row; peftlab.set_adapter(model, [...]) to LoRA-family "
            f"adapters only first"
        )
    residual = residual_adapters(model)
    if residual:
        raise ConfigError(
            f"adapter_rows: adapter {residual[0]!r} (init {configs[residual[0]].init!r}) holds "
            f"part of the base weights, so a base row would see the residual; save it with "
            f"conventional=True and load that"
        )
    layers = [m for _, m in adapter_layers(model) if isinstance(m, LoRALinear)]
    merged = sorted({n for m in layers for n in m.merged})
    if merged:
        raise ConfigError(
            f"adapter_rows: adapters {merged} are merged into the base weights; "
            f"peftlab.unmerge(model) first"
        )


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of each batch uses adapter ``names[i]`` (None: the base).

    Example::

        with peftlab.adapter_rows(model, ["math", None, "chat", "math"]):
            logits = model(input_ids=ids).logits      # ids has 4 rows
    """
    names = list(names)
    _check(model, names)
    rows = Rows(names)
    layers = [m for _, m in adapter_layers(model) if isinstance(m, LoRALinear)]
    for m in layers:
        m.__dict__["_rows"] = rows
    try:
        with _lora_group.grouping(False):
            yield model
    finally:
        for m in layers:
            m.__dict__.pop("_rows", None)
