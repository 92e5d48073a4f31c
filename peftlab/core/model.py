"""Model-level operations: apply a method, count parameters, merge, switch adapters.

peftlab adapts the user's ``transformers`` model in place. What it adds is either an adapter
layer (a module that wraps a base layer and implements :class:`AdapterLayer`) or model-level
state owned by a method (hooks, a prompt table) that the method's ``unload`` removes. What
peftlab records about the model (configs, active adapter, modules trained in full) is one
:class:`peftlab.core.state.ModelState`.

``apply`` is atomic: a refusal at any point leaves the model as it was
(:mod:`peftlab.core.snapshot`). Modules it adds take the train/eval mode of the place they are
added to, so a model in eval mode stays deterministic.

``modules_to_save`` resolves in one place, :func:`resolve_modules_to_save`, for every method:
None on a classification model means its new head (it must train, or the model cannot
classify), [] means nothing, names or suffixes name modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from peftlab.core import saved as _saved
from peftlab.core.config import ConfigError, MethodConfig
from peftlab.core.matching import set_submodule
from peftlab.core.registry import get_method, spec_for_config
from peftlab.core.snapshot import ModelSnapshot, atomic
from peftlab.core.state import (
    active_adapter,
    active_adapters,
    adapter_configs,
    adapters_disabled,
    clear_state,
    saved_modules,
    state_of,
    update_state,
)
from peftlab.core.tying import untie_adapted_embeddings

__all__ = [
    "AdapterLayer",
    "active_adapter",
    "active_adapters",
    "adapter_configs",
    "adapter_layers",
    "adding_adapter",
    "apply",
    "attach_adapter",
    "check_free",
    "classification_head",
    "held_adapters",
    "disable_adapters",
    "merge",
    "merge_and_unload",
    "resolve_modules_to_save",
    "saved_modules",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]

CLASSIFICATION_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
CLASSIFICATION_HEADS = ("classifier", "score")
"""Head names of transformers' *ForSequenceClassification / *ForTokenClassification models."""


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


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and not isinstance(module, type):
            yield name, module


def held_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters a peftlab module (an adapter layer, a virtual-token module) holds:
    the keys of its per-adapter ``ModuleDict``/``ParameterDict`` containers, outside the
    wrapped base layer."""
    names: list[str] = []
    for path, sub in module.named_children():
        if path != "base_layer" and isinstance(sub, (nn.ModuleDict, nn.ParameterDict)):
            names.extend(k for k in sub if k not in names)
    return names


def check_free(name: str, module: nn.Module, layer_cls: type) -> None:
    """Refuse (one line) to put a ``layer_cls`` adapter on ``module`` when another method's
    adapter layer already wraps it: peftlab puts one method on a layer (stacked wrappers
    would change every parameter's name and make merges ambiguous)."""
    if isinstance(module, AdapterLayer) and type(module) is not layer_cls:
        short = name.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{name} already carries adapter(s) {held_adapters(module)} of another method "
            f"({type(module).__name__}); peftlab puts one method on a layer. Give this adapter "
            f"target_modules that leave {short!r} out, or peftlab.merge_and_unload(model) first"
        )


def classification_head(model: nn.Module) -> str | None:
    """The new head of a classification model (``classifier`` or ``score`` of a
    *ForSequenceClassification / *ForTokenClassification), or None."""
    if not type(model).__name__.endswith(CLASSIFICATION_SUFFIXES):
        return None
    for name in CLASSIFICATION_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def resolve_modules_to_save(model: nn.Module, config: MethodConfig) -> list[str]:
    """Qualified names of the modules ``config`` trains in full and saves with the adapter.

    ``modules_to_save=None`` is a classification model's new head (:func:`classification_head`)
    and nothing on other models; ``[]`` is nothing; names match a module's qualified name or
    its suffix. ``config`` is not changed.

    Raises:
        ConfigError: a name matches no module; the message lists the top-level modules.
    """
    if config.modules_to_save is None:
        head = classification_head(model)
        return [head] if head else []
    out: list[str] = []
    names = [n for n, _ in model.named_modules() if n]
    for entry in config.modules_to_save:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ConfigError(
                f"modules_to_save entry {entry!r} matches no module; top-level modules are "
                f"{[n for n, _ in model.named_children()]}"
            )
        out.extend(h for h in hits if not any(h == o or h.startswith(o + ".") for o in out))
    return out


def apply(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt ``model`` in place with the method ``config`` describes and return it.

    Base parameters are frozen (except for ``full``); the new adapter's parameters and its
    ``modules_to_save`` (see :func:`resolve_modules_to_save`) train. More adapters may be
    added under other names, of the same method or of another one (a LoRA on the attention
    and a bottleneck adapter on the MLP, a prefix beside them), each on layers of its own;
    the new one becomes the one active adapter (:func:`set_adapter` activates several).
    Full fine-tuning shares the model with no adapter of another method. A refusal leaves the model
    exactly as it was.
    """
    with adding_adapter(model):
        attach_adapter(model, config, adapter_name)
        set_adapter(model, adapter_name)
    return model


@contextlib.contextmanager
def adding_adapter(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Around adding an adapter (:func:`attach_adapter`): a merged model is unmerged first (a
    new adapter is built on the base weights); if the block raises, everything is undone —
    the merged weights bit for bit. Modules added in the block follow the model's mode."""
    merged = {
        id(w): (w, w.detach().clone())
        for _, layer in adapter_layers(model)
        if getattr(layer, "merged", None)
        for w in [layer.base_layer.weight]
    }
    with atomic(model) as snapshot:
        try:
            if merged:
                unmerge(model)
            yield snapshot
            _follow_mode(model, snapshot)
        except BaseException:
            with torch.no_grad():
                for weight, value in merged.values():
                    weight.copy_(value)
            raise


def attach_adapter(
    model: nn.Module, config: MethodConfig, adapter_name: str, resolve_head: bool = True
) -> MethodConfig:
    """Put adapter ``adapter_name`` on ``model`` without activating it (``apply`` without
    :func:`set_adapter`, and without undo: run it inside :func:`peftlab.core.snapshot.atomic`).

    ``resolve_head=False`` reads ``modules_to_save=None`` as nothing (an adapter file records
    the head it trained by name, so None there means none). Returns the config recorded.
    """
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ConfigError(f"adapter_name={adapter_name!r} must be a Python identifier")
    _refuse_while_disabled(model, "adding an adapter")
    spec = spec_for_config(config)
    existing = adapter_configs(model)
    if adapter_name in existing:
        raise ConfigError(
            f"the model already has an adapter named {adapter_name!r}; pass another "
            f"adapter_name, or start from a fresh model"
        )
    full = any(not _prefix(c) for c in existing.values()) or not spec.param_prefix
    if full and any(c.method != spec.name for c in existing.values()):
        raise ConfigError(
            f"cannot apply {spec.name!r}: the model already carries "
            f"{', '.join(f'{n!r} ({c.method})' for n, c in existing.items())}, and full "
            f"fine-tuning trains every weight, so it shares the model with no adapter of another "
            f"method. "
            f"Call peftlab.merge_and_unload(model) first (for a mergeable method) or apply "
            f"{spec.name!r} to a fresh copy of the model"
        )
    saved: list[str] = []
    if resolve_head or config.modules_to_save is not None:
        saved = resolve_modules_to_save(model, config)
    if config.modules_to_save is None and saved:
        config = config.replace(modules_to_save=saved)  # the file records what it holds
    if spec.param_prefix:
        for p in model.parameters():
            p.requires_grad_(False)
    spec.apply(model, config, adapter_name)
    _refuse_nested(model)
    state = state_of(model)
    originals = dict(state.originals) if state else {}
    for name in saved:
        if name not in originals:  # trained in place: keep the base's copy for unload()
            originals[name] = _state_copy(model.get_submodule(name))
    update_state(
        model,
        configs={**existing, adapter_name: config},
        saved={**(state.saved if state else {}), adapter_name: tuple(saved)},
        originals=originals,
    )
    _saved.claim(model, adapter_name, tuple(saved))  # its own copy, from the base's values
    return config


def _refuse_while_disabled(model: nn.Module, what: str) -> None:
    """Inside ``disable_adapters`` the modules trained in full hold the base's values until the
    block ends and puts the adapter's back: changing which adapter holds them there would
    hand one adapter's values to another."""
    if adapters_disabled(model):
        raise ConfigError(
            f"{what} inside `with peftlab.disable_adapters(model):` is refused; leave the block "
            f"first"
        )


def _prefix(config: MethodConfig) -> str:
    return get_method(config.method).param_prefix


def _refuse_nested(model: nn.Module) -> None:
    """The safety net behind :func:`check_free`: no adapter layer may wrap another."""
    for name, layer in adapter_layers(model):
        if isinstance(layer.base_layer, AdapterLayer):
            check_free(name, layer.base_layer, type(layer))


def _follow_mode(model: nn.Module, snapshot: ModelSnapshot) -> None:
    """Put every module added since ``snapshot`` in the train/eval mode of its parent."""
    modules = dict(model.named_modules())
    flags = {name: m.training for name, m in modules.items() if not snapshot.is_new(m)}
    for name, module in modules.items():
        parent = name.rpartition(".")[0]
        if name and snapshot.is_new(module) and not snapshot.is_new(modules[parent]):
            module.train(modules[parent].training)  # recursive; module types may hook train()
    for name, flag in flags.items():  # a wrapped base layer keeps its own mode
        modules[name].training = flag


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (for ``load_state_dict`` later)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` the active (and trainable) adapter, or a list of names the active
    ones; every other adapter stays on the model, inactive and frozen.

    Several adapters compute together: each adapter layer applies its active adapters (a
    LoRA layer adds each one's update, a bottleneck layer applies its adapters in order), so
    adapters of different methods on different layers compose, as do several adapters of
    one method. Adapters of methods that put virtual tokens in front of the sequence
    (prompt, prefix, P-Tuning v2) are active one at a time.
    """
    # A name or a list/tuple of names; anything else is refused below as an unknown name.
    names = list(adapter_name) if isinstance(adapter_name, list | tuple) else [adapter_name]
    configs = adapter_configs(model)
    unknown = [n for n in names if not isinstance(n, str) or n not in configs]
    if unknown or not names or len(set(names)) != len(names):
        what = f"no adapter named {unknown[0]!r}" if unknown else f"adapter_name={names!r}"
        raise ConfigError(
            f"set_adapter: {what}; name one or more of the model's adapters {sorted(configs)}, "
            f"each once (peftlab.disable_adapters(model) computes as the base model)"
        )
    _check_composes(configs, names)
    _refuse_while_disabled(model, "set_adapter")
    state = state_of(model)
    _saved.check_one_trainer(state.saved if state else {}, names)
    for _, layer in adapter_layers(model):
        layer.set_adapter(names)
    _saved.sync(model, names)
    prefixes = {_prefix(c) for c in configs.values()} - {""}
    for name, p in model.named_parameters():
        if any(prefix in name for prefix in prefixes):
            p.requires_grad_(any(owns(name, n, prefixes) for n in names))
    for active in names:
        for name in saved_modules(model, active):
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    update_state(model, active=tuple(names))


def owner_index(param_name: str, adapter_name: str, prefixes: set[str] | str) -> int | None:
    """Where parameter ``param_name`` names adapter ``adapter_name``: the index of the dotted
    component that is the adapter's name, right after a component holding one of the methods'
    parameter ``prefixes`` (``…q_proj.lora_A.<name>.weight``,
    ``peftlab_prompt.prompt_embeddings.<name>``); None if it is not that adapter's."""
    prefixes = {prefixes} if isinstance(prefixes, str) else prefixes
    parts = param_name.split(".")
    return next(
        (
            i
            for i in range(1, len(parts))
            if parts[i] == adapter_name and any(p in parts[i - 1] for p in prefixes)
        ),
        None,
    )


def owns(param_name: str, adapter_name: str, prefixes: set[str] | str) -> bool:
    """Parameter ``param_name`` belongs to adapter ``adapter_name`` (:func:`owner_index`)."""
    return owner_index(param_name, adapter_name, prefixes) is not None


def _check_composes(configs: dict[str, MethodConfig], names: list[str]) -> None:
    """Refuse active sets whose adapters cannot compute together (one line each)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        tag = get_method(configs[n].method).exclusive
        if tag:
            groups.setdefault(tag, []).append(f"{n!r} ({configs[n].method})")
    for tag, members in groups.items():
        if len(members) > 1:
            raise ConfigError(
                f"set_adapter: {' and '.join(members)} cannot be active together: {tag}; "
                f"activate one of them (with any adapters of other methods)"
            )


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base model: merged adapters are unmerged,
    adapters are off, and modules trained in full (``modules_to_save``) hold their original
    weights; all of it comes back when the block ends. Merging inside the block is refused."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [getattr(layer, "disabled", False) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    state = state_of(model)
    trained = _swap_originals(model, state.originals if state else {})
    if state is not None:
        update_state(model, disabled=True)
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag
        if state_of(model) is not None:  # unload() inside the block removed it
            _swap_originals(model, trained)
            update_state(model, disabled=bool(state and state.disabled))


@torch.no_grad()
def _swap_originals(model: nn.Module, weights: dict) -> dict:
    """Load ``weights`` (module name → state dict) into the modules in place; returns what
    they held before."""
    held = {}
    for name, sd in weights.items():
        module = model.get_submodule(name)
        held[name] = _state_copy(module)
        module.load_state_dict(sd)
    return held


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
    if adapters_disabled(model):
        raise ConfigError(
            f"{what} inside `with peftlab.disable_adapters(model):` would merge nothing and drop "
            f"the adapter; leave the disable_adapters block first, then call {what}"
        )
    bad = sorted({c.method for c in configs.values() if not c.mergeable})
    if bad:
        raise ConfigError(
            f"{what}: {', '.join(bad)} cannot be merged into the base weights (its computation "
            f"is not a weight delta); keep the adapter unmerged or use peftlab.unload(model)"
        )


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the active adapter's update into the base weights (reversible with unmerge). An
    adapted output head tied to the input embeddings gets its own weight first."""
    _mergeable_or_raise(model, "merge")
    untie_adapted_embeddings(model)
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
    untie_adapted_embeddings(model)
    return _unload(model, merge=True, **kwargs)


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the model computes as its base again."""
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool, **kwargs) -> nn.Module:
    for name, layer in list(adapter_layers(model)):
        set_submodule(model, name, layer.unload(merge=merge, **kwargs))
    state = state_of(model)
    if state is not None and not merge:  # modules_to_save trained in place go back
        with torch.no_grad():
            for name, sd in state.originals.items():
                model.get_submodule(name).load_state_dict(sd)
    for config in adapter_configs(model).values():
        spec = get_method(config.method)
        if spec.unload is not None:
            spec.unload(model)
    clear_state(model)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model
