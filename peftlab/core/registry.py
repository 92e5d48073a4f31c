"""The method registry: name → config class + apply function.

A method is one file in ``peftlab/methods/`` ending with one :func:`register_method` line.
Nothing outside this registry branches on the method's name. The core knows no method: the
package (``peftlab/__init__.py``) imports :mod:`peftlab.methods`, which registers the built-in
ones, before anything can look a method up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from peftlab.core.config import ConfigError, MethodConfig

ApplyFn = Callable[[nn.Module, MethodConfig, str], None]


@dataclasses.dataclass(frozen=True)
class MethodProfile:
    """What ``peftlab recommend`` assumes of a method before it is measured: priors from the
    method's paper (sources in docs/estimator.md), replaced by ``peftlab compare`` numbers."""

    quality: dict[str, float]
    """Expected quality relative to full fine-tuning per task ("generation", "classification",
    "multi-task")."""
    speed: float
    """Training speed relative to LoRA."""
    overhead: float
    """Inference slowdown as a fraction of the base model's latency (0: none)."""
    inference: str
    """The inference overhead, in words."""
    ladder: Callable[[Any, str], list[dict]] | None = None
    """``(Architecture, quality) → config settings`` to try, best quality first; ``quality`` is
    "highest", "high" or "balanced". None: the method's defaults only."""


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
    memory_plan: Callable[[Any, dict], Any] | None = None
    """The memory estimator's closed form: ``(Architecture, fields) → MethodPlan`` (both from
    :mod:`peftlab.select`), where ``fields`` holds the ``memory_fields`` of the config (defaults
    from ``config_cls``) plus ``modules_to_save`` when given. None: the estimator and the
    recommender have no model of the method."""
    memory_fields: tuple[str, ...] = ()
    """The config fields ``memory_plan`` reads."""
    profile: MethodProfile | None = None
    """The recommender's priors; None: ``peftlab recommend`` does not rank the method."""


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
