"""Per-module ranks and scales, and a subset of the layers, for the LoRA family.

A LoRA-family config (LoRA, DoRA, QLoRA) may give some of its targeted modules another rank or
alpha, and may adapt only some of the model's layers, with peft's meaning of the same keys:

- ``rank_pattern`` / ``alpha_pattern``: ``{key: value}``. A targeted module named ``n`` takes
  the value of the first key ``k`` (in the mapping's order) for which ``n`` matches the regular
  expression ``(.*\\.)?(k)$`` — ``k`` is the name's last component(s) or a regex over them
  (``"q_proj"``, ``"layers.0.self_attn.q_proj"``, ``"(q|v)_proj"``); others take ``r`` /
  ``alpha``. Its scaling is then ``alpha_n / r_n`` (``alpha_n / √r_n`` with ``use_rslora``).
- ``layers_to_transform``: a layer index or a list of them. A targeted module is kept only if
  its name carries one of them as a layer index: the number after ``<layers_pattern>.``
  (``"layers"`` → ``model.layers.3.mlp.down_proj`` is in layer 3), or, with no
  ``layers_pattern``, the first number that follows a dotted name component after at least one
  other component (``model.layers.3.…``, ``transformer.h.3.…``). A module without an index is
  not in any layer and is left out.

A key that matches no targeted module is an error (a typo would silently train the default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from peftlab.core.config import ConfigError, check


def matches(key: str, name: str) -> bool:
    r"""Whether module name ``name`` matches pattern key ``key``: ``(.*\.)?(key)$``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_key(pattern: Mapping[str, object] | None, name: str) -> str | None:
    """The first key of ``pattern`` that ``name`` matches (see the module docstring), or None."""
    return next((key for key in pattern or {} if matches(key, name)), None)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index in module name ``name`` (see the module docstring), or None."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def check_patterns(config) -> None:
    """The pattern keys' values and regexes, and ``layers_to_transform``'s indices."""
    for key in ("rank_pattern", "alpha_pattern"):
        for k, v in (getattr(config, key) or {}).items():
            try:
                re.compile(k)
            except re.error as e:
                raise ConfigError(f"{key} key {k!r} is not a valid regex ({e})") from None
            if key == "rank_pattern":
                ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
                check(ok, f"{key}.{k}", v, "a positive integer rank")
            else:
                check(v > 0, f"{key}.{k}", v, "a positive number")
    layers = config.layers_to_transform
    if layers is not None:
        items = [layers] if isinstance(layers, int) else list(layers)
        check(
            len(items) > 0 and all(i >= 0 for i in items),
            "layers_to_transform",
            layers,
            "null (every layer), a layer index or a non-empty list of them (>= 0)",
        )


def kept_layers(config, names: list[str]) -> list[str]:
    """``names`` in the layers ``config.layers_to_transform`` selects (all without it).

    Raises:
        ConfigError: none of ``names`` is in those layers.
    """
    layers = config.layers_to_transform
    if layers is None:
        return names
    wanted = {layers} if isinstance(layers, int) else set(layers)
    kept = [n for n in names if layer_index(n, config.layers_pattern) in wanted]
    if not kept:
        found = sorted(
            {i for n in names if (i := layer_index(n, config.layers_pattern)) is not None}
        )
        raise ConfigError(
            f"layers_to_transform={layers!r} selects none of the targeted modules; their layer "
            f"indices are {found or 'not found'} (layers_pattern={config.layers_pattern!r})"
        )
    return kept


def check_keys_match(config, names: list[str]) -> None:
    """Every pattern key matches at least one of the targeted ``names``."""
    for key in ("rank_pattern", "alpha_pattern"):
        for k in getattr(config, key) or {}:
            if not any(matches(k, n) for n in names):
                sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:8])
                raise ConfigError(
                    f"{key} key {k!r} matches none of the targeted modules (their last names: "
                    f"{sample}); use a name's last component(s) or a regex over them"
                )


def module_rank(config, name: str) -> int:
    """The rank of the targeted module ``name``."""
    key = pattern_key(config.rank_pattern, name)
    return int(config.rank_pattern[key] if key is not None else config.r)


def module_rank_alpha(config, name: str) -> tuple[int, float]:
    """``(r, alpha)`` of the targeted module ``name``."""
    key = pattern_key(config.alpha_pattern, name)
    alpha = config.alpha_pattern[key] if key is not None else config.alpha
    return module_rank(config, name), float(alpha)


def has_patterns(config) -> bool:
    """Whether some module may have another rank or scale than ``config.r`` / ``scaling``."""
    return bool(config.rank_pattern or config.alpha_pattern)


def peft_lora_fields(config) -> dict:
    """Fields of peft's LoraConfig for ``adapter_config.json`` (of a ``LoRAConfig``), the
    patterns in peft's spelling."""
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": {"kaiming": True}.get(config.init, config.init),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        "layers_to_transform": _peft_layers(config.layers_to_transform),
        "layers_pattern": config.layers_pattern,
        "task_type": None,
        "inference_mode": True,
    }


def _peft_layers(layers: int | list[int] | None) -> list[int] | None:
    """``layers_to_transform`` as peft writes it: a list (or null)."""
    return [layers] if isinstance(layers, int) else (list(layers) if layers is not None else None)


def embedding_file_key(config, key: str) -> str:
    """peft's file key for a tensor: an embedding's factors are ``….lora_embedding_A`` /
    ``_B`` (peft holds them as bare parameters; peftlab's have a ``.weight``)."""
    if ".lora_embedding_" in key and key.endswith(".weight"):
        return key[: -len(".weight")]
    return key
