"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort, Asano, ICLR 2024, "VeRA:
Vector-based Random Matrix Adaptation", https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices is shared by every adapted layer of an adapter; each layer
trains only two vectors that scale it:

    h = W0·x + Λ_b·B·Λ_d·A·x,   A ∈ R^{r×in},  B ∈ R^{out×r},  Λ_d = diag(d), d ∈ R^r,
                                                              Λ_b = diag(b), b ∈ R^out

The pair is drawn once per adapter, sized for the largest targeted layer (``A``: ``r × max_in``,
``B``: ``max_out × r``), and a layer of width ``(in, out)`` uses ``A[:, :in]`` and
``B[:out, :]``. Both are Kaiming-uniform with gain √2 (bound ``√3·√2/√fan_in``, ``fan_in`` the
second dimension: ``max_in`` for ``A``, ``r`` for ``B``), drawn on the CPU in float32 from
``torch.Generator().manual_seed(projection_prng_key)`` — ``A`` first, then ``B`` — exactly as
peft draws them, so a key rebuilds the same pair and the file may leave it out
(``save_projection=False``). ``d`` starts at ``d_initial`` and ``b`` at zero, so the model is
unchanged at init; only ``d`` and ``b`` train: ``Σ_layers (out + r)`` parameters.

The forward pass keeps the factored form, ``y += b ⊙ (B_s·(d ⊙ (A_s·x)))``, two thin matmuls
as in LoRA; autograd keeps ``A_s·x`` (r per token, for ``d``'s gradient) and ``B_s·(…)`` (out
per token, for ``b``'s), not the layer input (``A`` and ``B`` are frozen). The update
``ΔW = (b·1ᵀ ⊙ B_s)·(d·1ᵀ ⊙ A_s)`` (``[out, in]``) folds exactly into ``W0`` (``merge``).

The vectors are ``vera_lambda_b[name]`` and ``vera_lambda_d[name]`` of each layer, the pair
the buffers ``A`` and ``B`` of ``model.peftlab_vera.vera_projection[name]``; adapter files
use peft's ``VERA`` layout (``….vera_lambda_b`` per layer, ``base_model.vera_A`` and
``base_model.vera_B`` for the pair), so they load both ways.
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

ATTR = "peftlab_vera"
"""The model attribute that holds every VeRA adapter's projection pair."""
PROJECTION_KEY = f"base_model.model.{ATTR}.vera_projection."
"""The generic file key of a projection buffer, before :func:`vera_file_key` renames it."""
VERA_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
"""Learning rates searched for VeRA. Only vectors train, and like IA³'s they want rates far
above LoRA's (the paper trains them around 1e-2; peft's MetaMathQA benchmark ran VeRA at 1e-3
with r=256). Measured on SST-2/MiniLM (docs/results/README.md, r 256, 48 steps of 16): on the
first grid (1e-3…3e-2) validation accuracy rose with lr to its edge (0.71 at 1e-3…1e-2 after
18 steps; 0.755, 0.775 at 1e-2, 3e-2 after 36) and the search walked past it to 9e-2 (0.81;
2.7e-1 collapsed to 0.575) on every seed, scoring 0.792 ± 0.014 test accuracy. So the grid
is one step higher and the prior 3e-2."""


@dataclasses.dataclass(frozen=True)
class VeRAConfig(MethodConfig):
    """Trained vectors scaling frozen random projections shared by the targeted linear layers."""

    mergeable = True

    r: int = 256
    """Rank of the shared random projections; each layer trains r + out numbers."""
    target_modules: str | list[str] = "all-linear"
    """Module names/suffixes, a regex, or "all-linear" (every linear layer but the output head)."""
    projection_prng_key: int = 0
    """Seed of the generator that draws the shared A and B (peft's draw: the same key, the same
    matrices)."""
    save_projection: bool = True
    """Store A and B in the adapter file; false: rebuild them from projection_prng_key at load."""
    d_initial: float = 0.1
    """Initial value of every entry of d (b starts at zero, so the model is unchanged)."""
    dropout: float = 0.0
    """Dropout on the input of the VeRA path, in [0, 1)."""
    init_weights: bool = True
    """Start b at zero and d at d_initial; false: both random (a test aid)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.r, int) and self.r > 0, "r", self.r, "a positive integer, e.g. 256")
        check(
            0 <= self.projection_prng_key < 2**64,
            "projection_prng_key",
            self.projection_prng_key,
            "an integer in [0, 2**64), e.g. 0",
        )
        check(
            self.d_initial != 0,
            "d_initial",
            self.d_initial,
            "a finite non-zero number, e.g. 0.1 (at 0, with b at 0, neither vector gets a gradient)",
        )
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1), e.g. 0.05")
        check_target_modules(self.target_modules)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A float32 CPU tensor of ``shape`` drawn from U(-c, c), ``c = √3·(√2/√shape[1])``: Kaiming
    uniform with gain √2 over the fan-in ``shape[1]``, drawn from ``generator``."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """One adapter's frozen pair: buffers ``A`` (``[r, max_in]``) and ``B`` (``[max_out, r]``)."""

    def __init__(self, r: int, max_in: int, max_out: int, key: int, device, dtype) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(key)
        a = kaiming_uniform((r, max_in), g)
        b = kaiming_uniform((max_out, r), g)
        self.register_buffer("A", a.to(device=device, dtype=dtype))
        self.register_buffer("B", b.to(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


class VeRAProjections(nn.Module):
    """The model-level module (``model.peftlab_vera``) holding each VeRA adapter's pair."""

    def __init__(self) -> None:
        super().__init__()
        self.vera_projection = nn.ModuleDict()


class VeRALinear(DenseDeltaLinear):
    """A linear layer (``nn.Linear`` or ``Conv1D``) plus VeRA adapters; the base is wrapped.

    ``_projections[name]`` is the adapter's shared :class:`VeRAProjection`, held by reference
    (a plain dict, not a submodule: the pair is the model's, stored once)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self._projections: dict[str, VeRAProjection] = {}

    def add_adapter(self, name: str, config: VeRAConfig) -> None:
        kw = self._factory()
        if config.init_weights:
            b = torch.zeros(self.out_features, **kw)
            d = torch.full((config.r,), float(config.d_initial), **kw)
        else:
            b, d = torch.randn(self.out_features, **kw), torch.randn(config.r, **kw)
        self.vera_lambda_b[name] = nn.Parameter(b)
        self.vera_lambda_d[name] = nn.Parameter(d)
        self.vera_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling[name] = 1.0

    def _sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :in], B[:out, :])`` of adapter ``name``'s pair, in its vectors' dtype."""
        pair, d = self._projections[name], self.vera_lambda_d[name]
        a = pair.A[:, : self.in_features].to(device=d.device, dtype=d.dtype)
        b = pair.B[: self.out_features, :].to(device=d.device, dtype=d.dtype)
        return a, b

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``; the update is never built dense here."""
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return y
        for name in self.active:
            lam_b, lam_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            a, b = self._sliced(name)
            h = self.vera_dropout[name](x.to(lam_d.dtype))
            u = nn.functional.linear(lam_d * nn.functional.linear(h, a), b)
            y = y + (lam_b * u).to(y.dtype)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """``(b·1ᵀ ⊙ B_s)·(d·1ᵀ ⊙ A_s)`` as ``[out, in]``."""
        a, b = self._sliced(name)
        lam_b, lam_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        return (lam_b[:, None] * b) @ (lam_d[:, None] * a)


def _apply(model: nn.Module, config: VeRAConfig, adapter_name: str) -> None:
    """Wrap the targets, then draw the adapter's pair for the largest of them and hand every
    adapted layer a reference to it."""
    add_dense_adapters(model, config, adapter_name, VeRALinear, "VeRA")
    layers = [m for m in model.modules() if isinstance(m, VeRALinear) and adapter_name in m.scaling]
    max_in = max(layer.in_features for layer in layers)
    max_out = max(layer.out_features for layer in layers)
    holder = model._modules.get(ATTR)
    if holder is None:
        holder = VeRAProjections()
        model.add_module(ATTR, holder)
    pair = VeRAProjection(
        config.r, max_in, max_out, config.projection_prng_key, **layers[0]._factory()
    )
    holder.vera_projection[adapter_name] = pair
    for layer in layers:
        layer._projections = {**layer._projections, adapter_name: pair}


def _unload(model: nn.Module) -> None:
    if ATTR in model._modules:
        del model._modules[ATTR]


def vera_file_key(config: VeRAConfig, key: str) -> str | None:
    """peft's file key for a tensor: the pair as ``base_model.vera_A`` / ``base_model.vera_B``
    (None, not stored, without ``save_projection``); the vectors keep the generic key."""
    if not key.startswith(PROJECTION_KEY):
        return key
    return f"base_model.vera_{key[len(PROJECTION_KEY) :]}" if config.save_projection else None


def peft_vera_fields(config: VeRAConfig) -> dict:
    """Fields of peft's VeraConfig for ``adapter_config.json``."""
    return {
        "peft_type": "VERA",
        "r": config.r,
        "target_modules": config.target_modules,
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": config.modules_to_save,
        "init_weights": config.init_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": None,
        "inference_mode": True,
    }


register_method(
    MethodSpec(
        "vera",
        VeRAConfig,
        _apply,
        "vera_",
        peft_export=peft_vera_fields,
        unload=_unload,
        file_key=vera_file_key,
        tuning=Tuning(3e-2, {"lr": VERA_LRS, "r": (64, 256, 1024)}),
    )
)
