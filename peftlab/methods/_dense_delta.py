"""Adapters whose update is a dense ``[out, in]`` matrix built from small factors (LoHa,
LoKr): the layer and apply logic they share.

A :class:`DenseDeltaLinear` wraps a linear base layer (``nn.Linear`` or ``Conv1D``) and adds,
for each active adapter, ``ΔW·x`` where ``ΔW = delta_weight(name)`` (``[out, in]``) is built in
every forward from the adapter's factors (autograd keeps it for backward). It merges exactly:
``W = W0 + ΔW``, and ``unmerge`` subtracts the same ``ΔW``. Subclasses define the factors
(``add_adapter``) and ``delta_weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.matching import find_targets, set_submodule
from peftlab.core.model import check_free
from peftlab.core.weights import dense_weight, features, is_quantized, write_dense_weight
from peftlab.core.wrapper import BaseLayerAttributes


class DenseDeltaLinear(BaseLayerAttributes, nn.Module):
    """A linear layer plus adapters with dense updates; the base layer is wrapped, not copied."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, config) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s update ``ΔW`` as ``[out, in]``."""
        raise NotImplementedError

    def _factory(self) -> dict:
        """``device`` and ``dtype`` new factors take: the base weight's (float32 if it is not
        floating point)."""
        w = self.base_layer.weight
        return {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}

    def set_adapter(self, names: list[str]) -> None:
        if self.merged:
            self.unmerge()
        self.active = [n for n in names if n in self.scaling]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``."""
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return y
        for name in self.active:
            delta = self.delta_weight(name)
            y = y + nn.functional.linear(x.to(delta.dtype), delta).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.disabled:
            return
        for name in self.active:
            if name not in self.merged:
                w = dense_weight(self.base_layer)
                write_dense_weight(self.base_layer, w + self.delta_weight(name).to(w.dtype))
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            w = dense_weight(self.base_layer)
            write_dense_weight(self.base_layer, w - self.delta_weight(name).to(w.dtype))

    def unload(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self.merge()
        else:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.scaling)}"


def add_dense_adapters(model: nn.Module, config, adapter_name: str, layer_cls: type, what: str):
    """Wrap every layer ``config.target_modules`` selects in ``layer_cls`` (reusing a wrapper
    already there) and add adapter ``adapter_name``; a 4-bit layer is refused first."""
    targets = find_targets(model, config.target_modules)
    for name in targets:
        module = model.get_submodule(name)
        check_free(name, module, layer_cls)
        if not isinstance(module, layer_cls) and is_quantized(module):
            raise ConfigError(
                f"target_modules: {name} is a 4-bit layer; {what} needs a 16/32-bit base (for a "
                f"4-bit base use method 'qlora')"
            )
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, layer_cls):
            module = layer_cls(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config)
