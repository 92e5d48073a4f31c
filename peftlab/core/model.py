"""Model-level operations: apply a method, count parameters, merge, switch adapters.

peftlab adapts the user's ``transformers`` model in place. What it adds is either an adapter
layer (a module that wraps a base layer and implements :class:`AdapterLayer`) or model-level
state owned by a method (hooks, a prompt table) that the method's ``unload`` removes. The
configs applied are kept in ``model.peftlab_config`` (adapter name → config).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig
from peftlab.core.matching import set_submodule
from peftlab.core.registry import get_method, spec_for_config

CONFIG_ATTR = "peftlab_config"
ACTIVE_ATTR = "peftlab_active"
ORIGINALS_ATTR = "peftlab_saved_originals"
"""Module name → the state dict a ``modules_to_save`` module had before training, for unload()."""


@runtime_checkable
class AdapterLayer(Protocol):
    """What every layer that wraps a base layer can do."""

    base_layer: nn.Module

    def merge(self) -> None:
        """Fold the active adapters' update into the base weight."""

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""

    def set_adapter(self, names: list[str]) -> None:
        """Make ``names`` the active adapters (the others stay, inactive and frozen)."""

    def unload(self, merge: bool = True, **kwargs) -> nn.Module:
        """The base layer, with the active adapters merged into it if ``merge``."""


def adapter_configs(model: nn.Module) -> dict[str, MethodConfig]:
    """Adapter name → config of everything :func:`apply` put on ``model``."""
    return getattr(model, CONFIG_ATTR, {})


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, ACTIVE_ATTR, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and not isinstance(module, type):
            yield name, module


def apply(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt ``model`` in place with the method ``config`` describes and return it.

    Base parameters are frozen (except for ``full``); the new adapter's parameters train.
    A second adapter of the same method may be added under another name; stacking a
    different method on top is refused.
    """
    spec = spec_for_config(config)
    existing = adapter_configs(model)
    if adapter_name in existing:
        raise ConfigError(
            f"the model already has an adapter named {adapter_name!r}; pass another "
            f"adapter_name, or start from a fresh model"
        )
    clash = [f"{n!r} ({c.method})" for n, c in existing.items() if c.method != spec.name]
    if clash:
        raise ConfigError(
            f"cannot apply {spec.name!r}: the model already carries {', '.join(clash)}, and "
            f"peftlab does not stack different methods. Call peftlab.merge_and_unload(model) "
            f"first (for a mergeable method) or apply {spec.name!r} to a fresh copy of the model"
        )
    if not adapter_name.isidentifier():
        raise ConfigError(f"adapter_name={adapter_name!r} must be a Python identifier")
    grad_state = {p: p.requires_grad for p in model.parameters()}
    if spec.param_prefix:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        spec.apply(model, config, adapter_name)
    except BaseException:
        # A method that refuses the model (or a target that matches nothing) leaves it as it was.
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
        raise
    setattr(model, CONFIG_ATTR, {**existing, adapter_name: config})
    originals = model.__dict__.setdefault(ORIGINALS_ATTR, {})
    for name in saved_module_names(model, config):
        if name not in originals:  # trained in place: keep the base's copy for unload()
            originals[name] = state_copy(model.get_submodule(name))
    set_adapter(model, adapter_name)
    return model


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (for ``load_state_dict`` later)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the one active (and trainable) adapter."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    spec = get_method(configs[adapter_name].method)
    for _, layer in adapter_layers(model):
        layer.set_adapter([adapter_name])
    if spec.param_prefix:
        for name, p in model.named_parameters():
            if spec.param_prefix in name:
                p.requires_grad_(f".{adapter_name}." in f".{name}.")
    for name in saved_module_names(model, configs[adapter_name]):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, ACTIVE_ATTR, adapter_name)


def saved_module_names(model: nn.Module, config: MethodConfig) -> list[str]:
    """Qualified names of the config's ``modules_to_save`` (an unknown name is an error)."""
    out: list[str] = []
    names = [n for n, _ in model.named_modules() if n]
    for entry in config.modules_to_save or []:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ConfigError(
                f"modules_to_save entry {entry!r} matches no module; top-level modules are "
                f"{[n for n, _ in model.named_children()]}"
            )
        out.extend(h for h in hits if not any(h.startswith(o + ".") for o in out))
    return out


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model (merged adapters are unmerged)."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [getattr(layer, "disabled", False) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    hooks_owner = getattr(model, "peftlab_disabled", None)
    model.peftlab_disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        model.peftlab_disabled = hooks_owner or False


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit packed weights count their real size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _mergeable_or_raise(model: nn.Module, what: str) -> None:
    configs = adapter_configs(model)
    if not configs:
        raise ConfigError(f"{what}: the model carries no peftlab adapter; call peftlab.apply first")
    bad = sorted({c.method for c in configs.values() if not c.mergeable})
    if bad:
        raise ConfigError(
            f"{what}: {', '.join(bad)} cannot be merged into the base weights (its computation "
            f"is not a weight delta); keep the adapter unmerged or use peftlab.unload(model)"
        )


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the active adapter's update into the base weights (reversible with unmerge)."""
    _mergeable_or_raise(model, "merge")
    for _, layer in adapter_layers(model):
        layer.merge()


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Take a merged update back out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, **kwargs) -> nn.Module:
    """Merge the active adapter and return the plain model, with no peftlab module left.

    Keyword arguments go to each layer's ``unload`` (QLoRA: ``dequantize=True``).
    """
    _mergeable_or_raise(model, "merge_and_unload")
    return _unload(model, merge=True, **kwargs)


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the model computes as its base again."""
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool, **kwargs) -> nn.Module:
    for name, layer in list(adapter_layers(model)):
        set_submodule(model, name, layer.unload(merge=merge, **kwargs))
    originals = model.__dict__.pop(ORIGINALS_ATTR, {})
    if not merge:  # modules_to_save trained in place go back to the base's weights
        with torch.no_grad():
            for name, sd in originals.items():
                model.get_submodule(name).load_state_dict(sd)
    for config in adapter_configs(model).values():
        spec = get_method(config.method)
        if spec.unload is not None:
            spec.unload(model)
    for attr in (CONFIG_ATTR, ACTIVE_ATTR, "peftlab_disabled"):
        model.__dict__.pop(attr, None)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model
