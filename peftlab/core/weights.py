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


def dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (``Params4bit``) as a dense tensor of its original shape.

    bitsandbytes' native CPU kernel (0.50) indexes blocks per row, while quantization blocks
    the flattened tensor; the two disagree when the row length is not a multiple of the
    blocksize (a 32-wide tiny model, or blocksize 128 on 64-wide rows) and it returns wrong
    values. Those cases are decoded here in plain torch, bit-identical to bitsandbytes'
    reference decoder; everything else uses bitsandbytes.
    """
    import bitsandbytes.functional as bnbf

    qs = weight.quant_state
    if weight.device.type != "cpu" or qs.shape[-1] % qs.blocksize == 0:
        return bnbf.dequantize_4bit(weight.data, qs)
    absmax = qs.absmax
    if qs.nested:  # double quantization: 8-bit absmax + fp32 scale per 256 + offset
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    absmax = absmax.float()
    packed = weight.data.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)  # high nibble first
    n, blocks = qs.shape.numel(), absmax.numel()
    values = qs.code.to(packed.device, torch.float32)[codes.long()][:n]
    values = nn.functional.pad(values, (0, blocks * qs.blocksize - n)).view(blocks, -1)
    return (values * absmax[:, None]).reshape(-1)[:n].view(qs.shape).to(qs.dtype)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense ``[out, in]`` tensor (dequantized if it is 4-bit)."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        return dequantize_4bit(w)
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
