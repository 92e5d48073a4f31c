"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al. 2022, "FedPara: Low-Rank
Hadamard Product for Communication-Efficient Federated Learning",
https://arxiv.org/abs/2108.06098; LyCORIS's LoHa).

The update of a targeted linear layer is the elementwise (Hadamard) product of two rank-``r``
matrices:

    h = W0·x + ΔW·x,   ΔW = s · (B1·A1) ⊙ (B2·A2),   A_i ∈ R^{r×in}, B_i ∈ R^{out×r},   s = alpha / r

``rank(ΔW) ≤ r²`` for ``2r·(in + out)`` parameters — LoRA's count at rank ``2r`` — so LoHa
reaches higher-rank updates than LoRA at the same size. ``A1, B1, B2`` start Kaiming-uniform
(a=√5) and ``A2`` at zero, so the model is unchanged at init. ΔW is a dense ``[out, in]`` matrix:
every forward builds it (and keeps it for the backward pass: one weight-sized tensor per
adapted layer, unlike LoRA), and it folds exactly into ``W0`` (``merge``).

Parameters are ``hada_w1_a[name]`` (B1, ``[out, r]``), ``hada_w1_b[name]`` (A1, ``[r, in]``),
``hada_w2_a[name]`` (B2) and ``hada_w2_b[name]`` (A2), as peft's LoHa names them, so adapter
files are interchangeable with peft's ``LOHA`` type.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from peftlab.core.config import MethodConfig, check
from peftlab.core.matching import check_target_modules
from peftlab.core.registry import MethodSpec, Tuning, register_method
from peftlab.methods._dense_delta import DenseDeltaLinear, add_dense_adapters

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
"""Learning rates searched for LoHa, a step above LoRA's: its update is a product of four
factors, one at zero, so it starts slower. On SST-2/MiniLM (``compare --tune lr --quick``,
20 steps) the validation accuracy rose with lr through LoRA's whole grid (0.63 at 1e-4-2e-3 for
7 steps; 0.66, 0.67, 0.715 at 2e-3, 4e-3, 8e-3 for 15), and 8e-3 scored 0.785 on the test.
LoKr uses the same grid: in the SST-2 study (48 steps) its search also walked past LoRA's grid,
to 8e-3 (docs/results/README.md)."""


@dataclasses.dataclass(frozen=True)
class LoHaConfig(MethodConfig):
    """Low-rank Hadamard product adaptation of the targeted linear layers."""

    mergeable = True

    r: int = 8
    """Rank of each of the two factors; the update's rank can reach r²."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r."""
    target_modules: str | list[str] = "all-linear"
    """Module names/suffixes, a regex, or "all-linear" (every linear layer but the output head)."""
    init_weights: bool = True
    """Start with the update at zero (A2 = 0); false: every factor random (a test aid)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.r, int) and self.r > 0, "r", self.r, "a positive integer, e.g. 8")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number, e.g. r")
        check_target_modules(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoHaLinear(DenseDeltaLinear):
    """A linear layer (``nn.Linear`` or ``Conv1D``) plus LoHa adapters; the base is wrapped."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for n in FACTORS:
            setattr(self, n, nn.ParameterDict())

    def add_adapter(self, name: str, config: LoHaConfig) -> None:
        kw = self._factory()
        shapes = {"a": (self.out_features, config.r), "b": (config.r, self.in_features)}
        for f in FACTORS:
            p = nn.Parameter(torch.empty(shapes[f[-1]], **kw))
            if f == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, f)[name] = p
        self.scaling[name] = config.scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·(B1·A1) ⊙ (B2·A2)`` as ``[out, in]`` (:class:`_Hadamard`: autograd keeps the
        four factors, not the two dense products)."""
        factors = (getattr(self, f)[name] for f in FACTORS)
        return _Hadamard.apply(*factors, self.scaling[name])


class _Hadamard(torch.autograd.Function):
    """``ΔW = s·(B1·A1) ⊙ (B2·A2)`` whose backward recomputes ``B1·A1`` and ``B2·A2`` from the
    saved factors instead of keeping both ``[out, in]`` products alive until backward (two
    matmuls more per step, two weight-sized tensors less per layer — as peft's LoHa):

        ∂W1 = s·g ⊙ W2,  ∂W2 = s·g ⊙ W1,  ∂B_i = ∂W_i·A_iᵀ,  ∂A_i = B_iᵀ·∂W_i.
    """

    @staticmethod
    def forward(ctx, b1, a1, b2, a2, scale: float):  # noqa: D102
        ctx.save_for_backward(b1, a1, b2, a2)
        ctx.scale = scale
        return (b1 @ a1) * (b2 @ a2) * scale

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        b1, a1, b2, a2 = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (b2 @ a2)  # ∂W1
        g2 = grad * (b1 @ a1)  # ∂W2
        return g1 @ a1.T, b1.T @ g1, g2 @ a2.T, b2.T @ g2, None


def _apply(model: nn.Module, config: LoHaConfig, adapter_name: str) -> None:
    add_dense_adapters(model, config, adapter_name, LoHaLinear, "LoHa")


def peft_loha_fields(config: LoHaConfig) -> dict:
    """Fields of peft's LoHaConfig for ``adapter_config.json``."""
    return {
        "peft_type": "LOHA",
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "target_modules": config.target_modules,
        "init_weights": config.init_weights,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": config.modules_to_save,
        "task_type": None,
        "inference_mode": True,
    }


register_method(
    MethodSpec(
        "loha",
        LoHaConfig,
        _apply,
        "hada_",
        peft_export=peft_loha_fields,
        tuning=Tuning(3e-3, {"lr": LOHA_LRS, "r": (4, 8, 16)}),
    )
)
