"""The one record of what peftlab did to a model.

Everything peftlab remembers about an adapted model is one :class:`ModelState`, kept under a
single attribute of the model (``peftlab_state``) and read and changed only through the
functions here — nothing else sets ``peftlab_*`` attributes on a model. The state is frozen:
a change stores a new one, so an undo (``peftlab.core.snapshot``) that puts the old object
back restores all of it at once, and no caller can change it behind the core's back.

Adapter layers and a method's own modules keep their mechanics (which adapters a layer holds,
its merged flag); the state holds what spans the model: the configs, the active adapter,
whether adapters are disabled, and the modules trained in full with their original weights
and each adapter's copy of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig

STATE_ATTR = "peftlab_state"


@dataclasses.dataclass(frozen=True)
class ModelState:
    """What peftlab put on one model. Read it with :func:`state_of`; change it through the
    functions of this module, which store a new object (the dicts are never changed in place)."""

    configs: dict[str, MethodConfig] = dataclasses.field(default_factory=dict)
    """Adapter name → its config, in the order the adapters were applied."""
    saved: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Adapter name → qualified names of its ``modules_to_save``, resolved when applied."""
    active: tuple[str, ...] = ()
    """The active (and trainable) adapters, in the order ``set_adapter`` was given them."""
    disabled: bool = False
    """Inside ``peftlab.disable_adapters``: the model computes as its base model."""
    originals: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """Module name → the state dict a ``modules_to_save`` module had before it trained in
    place, so ``unload`` can give the base model back."""
    holders: dict[str, str | None] = dataclasses.field(default_factory=dict)
    """Module trained in full → the adapter whose copy the live module holds (None: the base's
    values); see :mod:`peftlab.core.saved`."""
    parked: dict[str, dict[str, dict[str, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    """Adapter → module → its copy's tensors, for the modules another adapter (or the base)
    holds now."""


def state_of(model: nn.Module) -> ModelState | None:
    """The model's state, or None for a model peftlab has not adapted."""
    return model.__dict__.get(STATE_ATTR)


def update_state(model: nn.Module, **changes: Any) -> ModelState:
    """Store the model's state with ``changes`` (a fresh state if it has none) and return it."""
    state = dataclasses.replace(state_of(model) or ModelState(), **changes)
    # Straight into __dict__: the state is neither a parameter, a buffer nor a submodule.
    model.__dict__[STATE_ATTR] = state
    return state


def clear_state(model: nn.Module) -> ModelState | None:
    """Forget everything peftlab recorded on the model; returns what it was."""
    return model.__dict__.pop(STATE_ATTR, None)


def adapter_configs(model: nn.Module) -> dict[str, MethodConfig]:
    """Adapter name → config of everything ``apply`` put on ``model`` (a copy)."""
    state = state_of(model)
    return dict(state.configs) if state else {}


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the active adapters (empty when none is)."""
    state = state_of(model)
    return state.active if state else ()


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when none is.

    Raises:
        ConfigError: several adapters are active (``set_adapter(model, [a, b])``): the caller
            must name the one it means.
    """
    active = active_adapters(model)
    if len(active) > 1:
        raise ConfigError(
            f"several adapters are active ({', '.join(active)}); name the one you mean "
            f"(adapter_name=...)"
        )
    return active[0] if active else None


def adapters_disabled(model: nn.Module) -> bool:
    """Whether the model is inside ``peftlab.disable_adapters``."""
    state = state_of(model)
    return bool(state and state.disabled)


def saved_modules(model: nn.Module, adapter_name: str) -> tuple[str, ...]:
    """Qualified names of adapter ``adapter_name``'s ``modules_to_save``."""
    state = state_of(model)
    return state.saved.get(adapter_name, ()) if state else ()


def replace_config(model: nn.Module, adapter_name: str, config: MethodConfig) -> None:
    """Record ``config`` as adapter ``adapter_name``'s config, for a method that changed how
    the adapter is stored (prefix tuning's fold). Its method must stay the same."""
    configs = adapter_configs(model)
    old = configs.get(adapter_name)
    if old is None:
        raise ConfigError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    if type(old) is not type(config):
        raise ConfigError(
            f"adapter {adapter_name!r} is a {type(old).__name__}; it cannot be recorded as a "
            f"{type(config).__name__}"
        )
    update_state(model, configs={**configs, adapter_name: config})
