"""LoftQ initialization for QLoRA: start the adapter at the best rank-r correction of the 4-bit
quantization error (Li et al. 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
Language Models", ICLR, https://arxiv.org/abs/2310.08659).

A QLoRA layer computes ``(Q + s·B·A)·x`` with ``Q = dequant(NF4(W))``. Plain QLoRA starts at
``B = 0``, so the model it fine-tunes is the quantized one, ``‖W − Q‖`` away from the original.
LoftQ starts the adapter at the error's best rank-``r`` approximation instead:

    R = W − Q,   R = U·S·Vᵀ (SVD),   s·B·A = U_r·S_r·V_rᵀ,
    B = U_r·√S_r / √s,   A = √S_r·V_rᵀ / √s,

which by Eckart–Young minimizes ``‖W − (Q + s·B·A)‖_F`` over rank-``r`` updates: the error
falls from ``‖R‖_F`` to ``√(Σ_{i>r} S_i²)``. This is the one-step form that keeps the base
exactly as QLoRA quantizes it (peft's ``replace_lora_weights_loftq``): the adapter is an
ordinary QLoRA adapter on the ordinary NF4 base — saved, loaded (also by peft) and merged as
any — and only its starting point differs. (The paper's alternating form re-quantizes
``W − s·B·A`` for T steps; its base then differs from NF4(W) and must be shipped with the
adapter.) Needs the float weights: a base loaded in 4 bits is refused. With DoRA (QDoRA) the
magnitude starts at the row norms of ``Q + s·B·A``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftlab.core.weights import dense_weight

INIT = "loftq"


@torch.no_grad()
def correction(weight: torch.Tensor, quantized: torch.Tensor, r: int, scaling: float):
    """``(A, B)`` (``[r, in]``, ``[out, r]``, float32) with ``scaling·B·A`` the best rank-``r``
    approximation of ``weight − quantized`` (both ``[out, in]``)."""
    residual = weight.float() - quantized.float()
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt() / math.sqrt(scaling)
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def initialize(layer: nn.Module, name: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Write ``factors`` (from :func:`correction`) into adapter ``name`` of the QLoRA/QDoRA
    ``layer``; a DoRA magnitude is reset to the row norms of the new ``Q + s·B·A``."""
    A, B = factors
    layer.lora_A[name].weight.copy_(A.to(layer.lora_A[name].weight.dtype))
    layer.lora_B[name].weight.copy_(B.to(layer.lora_B[name].weight.dtype))
    layer._invalidate()
    magnitude = getattr(layer, "lora_magnitude_vector", {})
    if name in magnitude:
        magnitude[name].copy_(layer.weight_norm(name).to(magnitude[name].dtype))


def quantization_error(layer: nn.Module, original: torch.Tensor, name: str | None) -> float:
    """``‖W − (Q + s·B·A)‖_F / ‖W‖_F`` of a QLoRA layer (``name`` None: ``‖W − Q‖ / ‖W‖``)."""
    with torch.no_grad():
        approx = dense_weight(layer.base_layer).float()
        if name is not None:
            approx = approx + layer.delta_weight(name).float()
        w = original.float()
        return float((w - approx).norm() / w.norm())
