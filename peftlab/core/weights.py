"""Reading and writing a linear layer's weight as a dense ``[out, in]`` matrix.

``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``; bitsandbytes'
``Linear4bit`` stores packed NF4/FP4 codes plus a quant state. Methods that need ``W0`` (DoRA's
norm, merging) go through these two functions and never care which one they hold.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.core.matching import Conv1D


def features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer."""
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def is_quantized(layer: nn.Module) -> bool:
    return getattr(layer.weight, "quant_state", None) is not None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense ``[out, in]`` tensor (dequantized if it is 4-bit)."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    if Conv1D and isinstance(layer, Conv1D):
        return w.T
    return w


@torch.no_grad()
def write_dense_weight(layer: nn.Module, new: torch.Tensor) -> None:
    """Overwrite the layer's weight with the dense ``[out, in]`` tensor ``new`` (in place)."""
    if is_quantized(layer):
        raise TypeError(
            "cannot write into a 4-bit weight in place; replace the layer with a dense one "
            "(peftlab.merge_and_unload(model, dequantize=True)) or re-quantize it"
        )
    w = layer.weight
    if Conv1D and isinstance(layer, Conv1D):
        new = new.T
    w.copy_(new.to(w.dtype))
