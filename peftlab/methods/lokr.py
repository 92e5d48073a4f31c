"""LoKr: low-rank Kronecker product adaptation (Edalati et al. 2022, "KronA: Parameter
Efficient Tuning with Kronecker Adapter", https://arxiv.org/abs/2212.10650; LyCORIS's LoKr).

The update of a targeted linear layer (``W0 ∈ R^{out×in}``) is a Kronecker product:

    h = W0·x + ΔW·x,   ΔW = s · W1 ⊗ W2,   W1 ∈ R^{a×c},  W2 ∈ R^{b×d},  s = alpha / r

with ``out = a·b`` and ``in = c·d`` factored near their square roots (:func:`factorization`:
``(m, n)``, ``m ≤ n``, ``m`` the largest divisor not above ``√dim`` — or ``decompose_factor``
when that divides it). ``W2`` is low-rank, ``W2 = B2·A2`` (``B2 ∈ R^{b×r}``, ``A2 ∈ R^{r×d}``),
unless ``r ≥ max(b, d) / 2``, where a full ``W2`` is no larger; ``W1`` is full, or with
``decompose_both`` low-rank too under the same rule. ``W1`` (or its ``B1``) starts at zero and
the rest Kaiming-uniform (a=√5), so the model is unchanged at init. ``rank(ΔW) = rank(W1)·
rank(W2)``: a few thousand parameters reach a high-rank update. ΔW is built dense in every
forward (one weight-sized tensor per layer kept for backward) and folds exactly into ``W0``.

Parameters are named as peft's LoKr names them (``lokr_w1``, ``lokr_w1_a``, ``lokr_w1_b``,
``lokr_w2``, ``lokr_w2_a``, ``lokr_w2_b``), so adapter files are interchangeable with peft's
``LOKR`` type.
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
from peftlab.methods.loha import LOHA_LRS  # the same grid: see there and docs/methods/lokr.md

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dim``: ``(factor, dim / factor)`` when ``factor > 0`` divides
    ``dim``; else ``m`` the largest divisor of ``dim`` with ``m ≤ √dim`` (and ``m ≤ factor``
    when ``factor > 0``), ``n = dim / m``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = math.isqrt(dim) if factor <= 0 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


@dataclasses.dataclass(frozen=True)
class LoKrConfig(MethodConfig):
    """Low-rank Kronecker product adaptation of the targeted linear layers."""

    mergeable = True

    r: int = 8
    """Rank of the low-rank Kronecker factor(s)."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r."""
    target_modules: str | list[str] = "all-linear"
    """Module names/suffixes, a regex, or "all-linear" (every linear layer but the output head)."""
    decompose_both: bool = False
    """Also make the first (small) Kronecker factor low-rank."""
    decompose_factor: int = -1
    """Split each dimension with this factor when it divides it; -1: near the square root."""
    init_weights: bool = True
    """Start with the update at zero (W1 = 0); false: every factor random (a test aid)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.r, int) and self.r > 0, "r", self.r, "a positive integer, e.g. 8")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number, e.g. r")
        check(
            self.decompose_factor == -1 or self.decompose_factor > 0,
            "decompose_factor",
            self.decompose_factor,
            "-1 (near the square root) or a positive integer",
        )
        check_target_modules(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def factor_shapes(config: LoKrConfig, in_features: int, out_features: int) -> dict:
    """Parameter name → shape of one layer's adapter (see the module docstring)."""
    a, b = factorization(out_features, config.decompose_factor)
    c, d = factorization(in_features, config.decompose_factor)
    r = config.r
    out = {}
    if config.decompose_both and r < max(a, c) / 2:
        out.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        out["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        out["lokr_w2"] = (b, d)
    return out


class LoKrLinear(DenseDeltaLinear):
    """A linear layer (``nn.Linear`` or ``Conv1D``) plus LoKr adapters; the base is wrapped."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for n in NAMES:
            setattr(self, n, nn.ParameterDict())

    def add_adapter(self, name: str, config: LoKrConfig) -> None:
        kw = self._factory()
        for pname, shape in factor_shapes(config, self.in_features, self.out_features).items():
            p = nn.Parameter(torch.empty(shape, **kw))
            if config.init_weights and pname in ("lokr_w1", "lokr_w1_a"):
                nn.init.zeros_(p)  # W1 = 0 (or its B1): ΔW = 0 at init
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, pname)[name] = p
        self.scaling[name] = config.scaling

    def _factor(self, name: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}")
        if name in full:
            return full[name]
        return getattr(self, f"lokr_{which}_a")[name] @ getattr(self, f"lokr_{which}_b")[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · W1 ⊗ W2`` as ``[out, in]``."""
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2")) * self.scaling[name]


def _apply(model: nn.Module, config: LoKrConfig, adapter_name: str) -> None:
    add_dense_adapters(model, config, adapter_name, LoKrLinear, "LoKr")


def peft_lokr_fields(config: LoKrConfig) -> dict:
    """Fields of peft's LoKrConfig for ``adapter_config.json``."""
    return {
        "peft_type": "LOKR",
        "r": config.r,
        "alpha": config.alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "decompose_both": config.decompose_both,
        "decompose_factor": config.decompose_factor,
        "rank_dropout_scale": False,
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
        "lokr",
        LoKrConfig,
        _apply,
        "lokr_",
        peft_export=peft_lokr_fields,
        tuning=Tuning(3e-3, {"lr": LOHA_LRS, "r": (4, 8, 16)}),
    )
)
