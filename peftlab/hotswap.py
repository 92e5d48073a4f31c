"""Hot swap: replace a LoRA-family adapter's weights in place, without re-wrapping the model.

:func:`hotswap_adapter` copies another adapter's tensors into the parameters adapter
``adapter_name`` already has: no module is added, removed or replaced, no parameter object
changes (the copies are in place), and no Python attribute a compiled graph depends on
changes either — so a model under ``torch.compile`` runs the swapped adapter without
recompiling. The layers' cached plans hold modules, not values, and DoRA's norm caches are
keyed on the tensors' in-place write counters, which the copies bump.

The swapped adapter may have another ``alpha`` (or rsLoRA where the old one had none): the
layer keeps its scaling ``s_old`` (a float a compiled graph is specialised on) and the file's
``B`` is stored as ``B·s_new/s_old``, so ``s_old·B'·A = s_new·B·A`` — the same update, exact
up to one float rounding. The rank, the adapted layers and the method (LoRA vs DoRA) must be
the same; anything else is refused in one line, with the adapter unchanged. The recorded
config stays the old one (its rank and scaling still describe the stored tensors); dropout
stays the layer's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.io import (
    check_fit,
    drop_copied_base_weights,
    file_key,
    read_adapter_config,
    read_weights,
)
from peftlab.core.model import adapter_layers, merge, unmerge
from peftlab.core.registry import get_method
from peftlab.core.state import adapter_configs
from peftlab.methods._lora_init import RESIDUAL_INITS
from peftlab.methods.dora import DoRAConfig
from peftlab.methods.lora import LoRAConfig, LoRALinear

_MAGNITUDE = "lora_magnitude_vector"


def hotswap_adapter(
    model: nn.Module,
    adapter: str | os.PathLike | dict[str, torch.Tensor],
    adapter_name: str = "default",
) -> nn.Module:
    """Load the adapter ``adapter`` into the existing adapter ``adapter_name`` in place.

    Args:
        model: a model carrying LoRA, DoRA or QLoRA adapter ``adapter_name``.
        adapter: an adapter directory (``save_adapter``'s or peft's), or its tensors keyed
            as in the file (``base_model.model.….lora_A.weight``; taken at the adapter's own
            scaling, since a bare state has no config).
        adapter_name: the adapter whose weights are replaced.

    Raises:
        ConfigError: no such adapter, or not a LoRA-family one; AdapterFileError: the
            directory is unreadable or its config/tensors do not match the adapter's method,
            rank, layers or shapes, or hold non-finite values. The model is then unchanged.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(
            f"no adapter named {adapter_name!r} on the model; it has {sorted(configs)}"
        )
    old = configs[adapter_name]
    if not isinstance(old, LoRAConfig):
        raise ConfigError(
            f"adapter {adapter_name!r} is {old.method!r}; hot swap replaces LoRA-family "
            f"adapters (lora, dora, qlora)"
        )
    path, ratio = Path("<state dict>"), 1.0
    if isinstance(adapter, dict):
        tensors = dict(adapter)
    else:
        path = Path(adapter)
        new = read_adapter_config(path)
        _check_compatible(path, old, new)
        tensors, ratio = read_weights(path), new.scaling / old.scaling
    places = _places(model, adapter_name, old)
    drop_copied_base_weights(path, model, tensors, places)  # peft's copy of an embedding table
    check_fit(path, old, tensors, places, True, True)
    _copy(model, adapter_name, tensors, places, ratio)
    return model


def _residual(config) -> bool:
    """Whether ``config`` is a PiSSA/OLoRA adapter (its base holds a residual)."""
    return getattr(config, "init", "") in RESIDUAL_INITS


def _check_compatible(path: Path, old: LoRAConfig, new) -> None:
    """One line unless ``new`` can replace ``old`` in place (same method, DoRA-ness, rank)."""
    problems = []
    is_dora = lambda c: isinstance(c, DoRAConfig) or bool(getattr(c, "use_dora", False))  # noqa: E731
    if not isinstance(new, LoRAConfig) or is_dora(new) != is_dora(old):
        kind = "dora" if is_dora(new) else new.method
        problems.append(f"method {kind!r} vs the adapter's {'dora' if is_dora(old) else 'lora'!r}")
    elif new.r != old.r:
        problems.append(f"r={new.r} vs the adapter's r={old.r}")
    elif _residual(new) or _residual(old):  # the base holds this init's residual
        if (new.init, new.scaling) != (old.init, old.scaling):
            problems.append(f"init {new.init!r}, scaling {new.scaling:g} vs the adapter's "
                            f"{old.init!r}, {old.scaling:g}")  # fmt: skip
    elif (new.rank_pattern or new.alpha_pattern or old.rank_pattern or old.alpha_pattern) and (
        (new.rank_pattern, new.alpha_pattern, new.alpha, new.use_rslora)
        != (old.rank_pattern, old.alpha_pattern, old.alpha, old.use_rslora)
    ):  # per-module scales: one ratio cannot rescale them all
        problems.append("rank_pattern/alpha_pattern/alpha differ from the adapter's")
    if problems:
        raise ConfigError(
            f"{path} cannot be hot-swapped into a {old.method} adapter of r={old.r}: "
            f"{'; '.join(problems)} (hot swap needs the same shapes; use load_adapter)"
        )


def _places(model: nn.Module, adapter_name: str, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """File key → the live tensor of adapter ``adapter_name`` it loads into (keyed as
    ``save_adapter`` keys them: the method's ``file_key``, e.g. an embedding's factors)."""
    spec, out = get_method(config.method), {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = file_key(name, adapter_name, "lora_")
        if key is not None:
            out[key if spec.file_key is None else spec.file_key(config, key)] = t
    return out


@torch.no_grad()
def _copy(model, adapter_name: str, tensors: dict, places: dict, ratio: float) -> None:
    """Write ``tensors`` into ``places``: ``B`` times ``ratio``; a merged adapter is
    unmerged first and merged again after."""
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, LoRALinear)]
    merged = any(adapter_name in layer.merged for layer in layers)
    if merged:
        unmerge(model)
    for key, t in places.items():
        value = tensors[key].to(device=t.device, dtype=torch.float64)
        if (".lora_B." in key or ".lora_embedding_B" in key) and ratio != 1.0:
            value = value * ratio
        t.copy_(value.to(t.dtype))
    if merged:
        merge(model)
