"""Modules trained in full (``modules_to_save``): one copy per adapter.

A classification model's new head — or any module an adapter's ``modules_to_save`` names —
trains in full beside the adapter. When several adapters train the same module each gets its
own copy, as in peft: the live module holds the tensors of the active adapter that trains it,
or the base's original values when no active adapter does, and every other adapter's tensors
wait in the model's state (``parked``). A new adapter starts from the base's original values,
not from another adapter's trained ones.

Switching (:func:`sync`, run by ``set_adapter``) swaps tensor *objects* in the modules'
parameter and buffer dicts: no values are copied, an undo (:mod:`peftlab.core.snapshot`,
which restores those dicts and the model's state) puts a refused operation's swaps back, and
each adapter's parameters stay the very objects an optimizer built on them holds.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.state import ModelState, state_of, update_state

Tensors = dict[str, torch.Tensor]
"""A module's parameters and buffers by qualified name inside it."""


def tensors_of(module: nn.Module) -> Tensors:
    """The module's parameters and buffers (the objects, not copies)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _put(module: nn.Module, tensors: Tensors) -> None:
    """Make ``tensors`` the module's own (the same objects), by name."""
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = t
        else:
            owner._buffers[leaf] = t


def _fresh(module: nn.Module, original: Tensors) -> Tensors:
    """New tensors holding the base's ``original`` values, in the live ones' dtype and device
    (frozen; a name the original lacks — a non-persistent buffer — keeps the live object)."""
    out: Tensors = {}
    for name, live in tensors_of(module).items():
        if name not in original:
            out[name] = live
            continue
        value = original[name].detach().to(device=live.device, dtype=live.dtype).clone()
        out[name] = (
            nn.Parameter(value, requires_grad=False) if isinstance(live, nn.Parameter) else value
        )
    return out


def claim(model: nn.Module, adapter_name: str, modules: tuple[str, ...]) -> None:
    """Give new adapter ``adapter_name`` its own copy of each of ``modules``, starting from the
    base's values: another adapter's trained tensors there are parked first."""
    state = state_of(model)
    assert state is not None
    others = {m for a, mods in state.saved.items() if a != adapter_name for m in mods}
    for name in modules:
        inside = [o for o in others if o.startswith(name + ".") or name.startswith(o + ".")]
        if inside:
            raise ConfigError(
                f"modules_to_save: {name!r} overlaps {inside[0]!r}, which another adapter trains "
                f"in full; each adapter keeps its own copy of whole modules — name the same "
                f"module ({inside[0]!r} or {name!r}) in both"
            )
    holders, parked = dict(state.holders), _copy_parked(state)
    for name in modules:
        module = model.get_submodule(name)
        holder = holders.get(name)
        if holder is not None and holder != adapter_name:
            parked.setdefault(holder, {})[name] = tensors_of(module)
            _put(module, _fresh(module, state.originals[name]))
        holders[name] = adapter_name
    update_state(model, holders=holders, parked=parked)


def check_one_trainer(saved: dict[str, tuple[str, ...]], names: list[str]) -> None:
    """Refuse (one line) an active set in which two adapters train the same module: each has
    its own copy, and a module computes with one."""
    seen: dict[str, str] = {}
    for adapter in names:
        for module in saved.get(adapter, ()):
            if module in seen:
                raise ConfigError(
                    f"set_adapter: adapters {seen[module]!r} and {adapter!r} each train their own "
                    f"copy of {module!r} (modules_to_save), and the model computes with one; "
                    f"activate one of them"
                )
            seen[module] = adapter


@torch.no_grad()
def sync(model: nn.Module, active: tuple[str, ...] | list[str]) -> None:
    """Put in each module trained in full the copy of the active adapter that trains it, or
    the base's original values when none does (frozen then)."""
    state = state_of(model)
    if state is None or not state.originals:
        return
    holders, parked = dict(state.holders), _copy_parked(state)
    for name in {m for mods in state.saved.values() for m in mods}:
        want = next((a for a in active if name in state.saved.get(a, ())), None)
        current = holders.get(name)
        if current == want:
            continue
        module = model.get_submodule(name)
        if current is not None:
            parked.setdefault(current, {})[name] = tensors_of(module)
        mine = parked.get(want, {}).pop(name, None) if want is not None else None
        _put(module, mine if mine is not None else _fresh(module, state.originals[name]))
        holders[name] = want
        if want is None:
            for p in module.parameters():
                p.requires_grad_(False)
    update_state(model, holders=holders, parked=parked)


def adapter_module_state(model: nn.Module, adapter_name: str, name: str) -> Tensors:
    """Adapter ``adapter_name``'s copy of module ``name`` as its state dict (keep_vars): the
    live module's when the adapter holds it, else the parked tensors."""
    live = model.get_submodule(name).state_dict(keep_vars=True)
    state = state_of(model)
    mine = state.parked.get(adapter_name, {}).get(name) if state else None
    if mine is None:
        return live
    return {k: mine[k] for k in live}


def forget(model: nn.Module, adapter_name: str) -> None:
    """Drop adapter ``adapter_name``'s copies (``delete_adapter``): the modules it holds get
    the base's values back (:func:`sync` then gives them to another active adapter)."""
    state = state_of(model)
    assert state is not None
    holders, parked = dict(state.holders), _copy_parked(state)
    parked.pop(adapter_name, None)
    for name, holder in state.holders.items():
        if holder == adapter_name:
            module = model.get_submodule(name)
            _put(module, _fresh(module, state.originals[name]))
            holders[name] = None
    update_state(model, holders=holders, parked=parked)


def _copy_parked(state: ModelState) -> dict[str, dict[str, Tensors]]:
    """The parked copies as new dicts (the state is never changed in place)."""
    return {a: dict(mods) for a, mods in state.parked.items()}
