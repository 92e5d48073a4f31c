"""The method registry: name → config class + apply function (mechanics and peft export).

A method is one file in ``peftlab/methods/`` ending with one :func:`register_method` line.
Nothing outside this registry branches on the method's name. The core knows no method: the
package (``peftlab/__init__.py``) imports :mod:`peftlab.methods`, which registers the built-in
ones, before anything can look a method up. What the memory estimator and the recommender
know of a method (its closed form and priors) is theirs, in :mod:`peftlab.select.models`,
keyed by the same name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from peftlab.core.config import ConfigError, MethodConfig

ApplyFn = Callable[[nn.Module, MethodConfig, str], None]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """A method's learning-rate prior and the grids ``peftlab compare --tune`` searches.

    Declared where the method is registered, because a good setting is a property of the
    method (a virtual-token table wants a learning rate ~10× a low-rank adapter's, full
    fine-tuning ~20× less), not of the comparison."""

    lr: float
    """The learning rate the method runs at when nothing is tuned."""
    grid: dict[str, tuple] = dataclasses.field(default_factory=dict)
    """Training-config key (``lr``) or method option (``r``, ``num_virtual_tokens``, ...) →
    candidate values, in the order a tie is broken."""

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, float) and self.lr > 0):
            raise ValueError(f"Tuning.lr={self.lr!r} must be a positive float")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"Tuning.grid[{key!r}] is empty; give at least one value")


LOW_RANK_LRS = (1e-4, 3e-4, 1e-3, 2e-3)
"""Learning rates searched for low-rank adapters (LoRA, DoRA, QLoRA) and bottleneck adapters."""
VIRTUAL_TOKEN_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
"""Learning rates searched for virtual-token tables trained directly (prompt, P-Tuning v2)."""
PREFIX_MLP_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
"""Learning rates searched for Prefix-Tuning with its reparametrization MLP: every MLP weight
moves every prefix coordinate, so Adam's per-weight step moves the prefix far faster than a
directly trained table (Li & Liang trained it at 5e-5…8e-5). Measured on MiniLM/SST-2 (mean
pooling, 48 steps of 16, head trained too): dev accuracy 0.717 at 3e-4, 0.655 at 1e-3, 0.52
(the majority class) at 3e-3, where P-Tuning v2's table reaches 0.762 at 3e-3."""
FULL_LRS = (1e-5, 3e-5, 5e-5, 1e-4)
"""Learning rates searched for full fine-tuning."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know about one method."""

    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    """Adapt ``model`` in place for ``config`` under ``adapter_name``."""
    param_prefix: str
    """Every parameter this method adds has this in its name ("lora_", "adapter_", …); the
    trainable filter and adapter I/O are one substring test on it. Empty for ``full``."""
    peft_export: Callable[[MethodConfig], dict] | None = None
    """Fields of peft's ``adapter_config.json`` for this config, when peft can read it."""
    unload: Callable[[nn.Module], None] | None = None
    """Remove model-level state (hooks, extra modules) that is not an adapter layer."""
    export: Callable[[nn.Module, str], tuple[MethodConfig, dict]] | None = None
    """What ``save_adapter`` writes for adapter ``name`` instead of the live parameters: the
    config and the tensors by parameter name (prefix tuning saves its folded prefix table, not
    the reparameterization MLP that produced it). The model is not changed."""
    file_key: Callable[[MethodConfig, str], str | None] | None = None
    """Maps the generic file key of a tensor (``base_model.model.<name without the adapter
    name>``) to the key the file uses; None: the tensor is not stored (VeRA stores its shared
    projections as peft does, or not at all)."""
    tuning: Tuning | None = None
    """The method's learning-rate prior and search grids; None: compare runs it at the shared
    learning rate and cannot tune it."""
    exclusive: str | None = None
    """Adapters of methods with the same ``exclusive`` text cannot be active together; the
    text says why (``set_adapter`` prints it)."""


VIRTUAL_TOKENS = "each puts virtual tokens in front of the sequence"
"""``MethodSpec.exclusive`` of the virtual-token methods (prompt, prefix, P-Tuning v2)."""

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under ``spec.name`` and point its config class at that name."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    spec.config_cls.method = spec.name
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def spec_for_config(config: MethodConfig) -> MethodSpec:
    for spec in _REGISTRY.values():
        if type(config) is spec.config_cls:
            return spec
    raise ConfigError(f"{type(config).__name__} is not the config of a registered method")


def methods() -> list[str]:
    """Names of the registered methods."""
    return list(_REGISTRY)
