"""Removing one named adapter from a model and leaving every other one as it was.

An adapter lives in three places: entries keyed by its name in the per-adapter containers of
the peftlab modules that hold it (an adapter layer's ``lora_A[name]``, a prompt table's
``prompt_embeddings[name]``, and the plain dicts and lists beside them: scalings, caches,
``active``), the modules it trains in full (``modules_to_save``), and the model's record
(:mod:`peftlab.core.state`). :func:`delete_adapter` removes it from all three:

- a layer that holds other adapters keeps them and loses this one's entries; a layer left
  with no adapter is replaced by its base layer (unmerged: a merged adapter is refused);
- a method's model-level module (a virtual-token table and its hooks) goes with the method's
  last adapter;
- a module the adapter trained in full gets its original weights back unless another
  adapter still trains it.

The other adapters' parameters are the very same tensors before and after (nothing is
rebuilt), so their outputs, optimizer state and hot-swap targets are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.matching import set_submodule
from peftlab.core.model import AdapterLayer, adapter_layers, held_adapters, unload
from peftlab.core.registry import get_method
from peftlab.core.saved import forget, sync
from peftlab.core.snapshot import atomic
from peftlab.core.state import adapter_configs, adapters_disabled, state_of, update_state

__all__ = ["delete_adapter"]

_TORCH_ATTRS = frozenset(vars(nn.Module()))


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` from ``model`` (in place) and return the model.

    The other adapters stay, with their parameters, and the active ones stay active; if the
    removed adapter was the only active one, none is active until :func:`peftlab.set_adapter`.
    Removing the last adapter is :func:`peftlab.unload`: the model computes as its base again.

    Raises:
        ConfigError: no adapter has that name, the adapter is merged into the base weights
            (``peftlab.unmerge(model)`` first), or the call is inside
            ``peftlab.disable_adapters``. The model is unchanged.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(
            f"delete_adapter: no adapter named {adapter_name!r}; the model has {sorted(configs)}"
        )
    if adapters_disabled(model):
        raise ConfigError(
            "delete_adapter inside `with peftlab.disable_adapters(model):` is refused; leave the "
            "block first"
        )
    holders = [(n, m) for n, m in _peftlab_modules(model) if adapter_name in held_adapters(m)]
    if any(adapter_name in (getattr(m, "merged", None) or ()) for _, m in holders):
        raise ConfigError(
            f"delete_adapter: adapter {adapter_name!r} is merged into the base weights; call "
            f"peftlab.unmerge(model) first, or peftlab.merge_and_unload(model) to keep it merged"
        )
    if len(configs) == 1:
        return unload(model)
    with atomic(model):
        _remove(model, adapter_name, holders)
    return model


def _peftlab_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Adapter layers and methods' model-level modules (anything peftlab put on the model
    that holds adapters by name)."""
    layers = list(adapter_layers(model))
    ids = {id(m) for _, m in layers}
    others = [
        (n, m)
        for n, m in model.named_modules()
        if id(m) not in ids
        and type(m).__module__.startswith("peftlab.methods")
        and not isinstance(m, AdapterLayer)
    ]
    return layers + others


def _remove(model: nn.Module, adapter_name: str, holders: list[tuple[str, nn.Module]]) -> None:
    state = state_of(model)
    configs = dict(state.configs)
    method = configs.pop(adapter_name).method
    for name, module in holders:
        if isinstance(module, AdapterLayer) and held_adapters(module) == [adapter_name]:
            set_submodule(model, name, module.unload(merge=False))
        else:
            drop_entries(module, adapter_name)
    spec = get_method(method)
    if spec.unload is not None and not any(c.method == method for c in configs.values()):
        spec.unload(model)  # the method's last adapter: its hooks and modules go
    forget(model, adapter_name)  # its copies of modules trained in full
    state = state_of(model)
    saved = dict(state.saved)
    mine = saved.pop(adapter_name, ())
    still = {m for names in saved.values() for m in names}
    originals = dict(state.originals)
    with torch.no_grad():
        for module_name in mine:
            if module_name not in still and module_name in originals:
                model.get_submodule(module_name).load_state_dict(originals.pop(module_name))
    for module_name in mine:
        if module_name not in still:
            for p in model.get_submodule(module_name).parameters():
                p.requires_grad_(False)
    active = tuple(n for n in state.active if n != adapter_name)
    holders = {m: h for m, h in state.holders.items() if m in still}
    update_state(
        model, configs=configs, saved=saved, originals=originals, active=active, holders=holders
    )
    sync(model, active)  # another active adapter's copy into the modules it trains


def drop_entries(module: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``'s entries from ``module``: its per-adapter containers
    (direct ``ModuleDict``/``ParameterDict`` children), dicts keyed by adapter name and the
    lists of names (``active``, ``merged``) — assigned anew, so a layer that caches a plan
    on assignment drops it."""
    for child in list(module.children()):
        if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in child:
            del child[adapter_name]
    for key, value in list(vars(module).items()):
        if key in _TORCH_ATTRS:  # nn.Module's own bookkeeping (parameters, hooks, …)
            continue
        if isinstance(value, dict) and adapter_name in value:
            setattr(module, key, {k: v for k, v in value.items() if k != adapter_name})
        elif isinstance(value, list) and adapter_name in value:
            setattr(module, key, [n for n in value if n != adapter_name])
    invalidate = getattr(module, "_invalidate", None)
    if callable(invalidate):
        invalidate()
