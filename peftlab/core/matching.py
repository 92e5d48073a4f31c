"""Finding the modules a method targets: names/suffixes, a regex, or ``"all-linear"``.

Whether one qualified module name is selected is one predicate, :func:`matches_target`; it
reads only names, so :func:`find_targets` runs it over a model's modules and the memory
estimator over an architecture's (``peftlab.select``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from peftlab.core.config import ConfigError, check

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)  # type: ignore[assignment]
HEAD_NAMES = ("lm_head", "score", "classifier", "cls", "qa_outputs")
"""Top-level task heads that "all-linear" leaves alone (they are trained in full when needed)."""
ALL_LINEAR = "all-linear"

TargetSpec = str | Sequence[str]


def is_head_name(name: str) -> bool:
    """``name`` is (inside) a top-level task head (:data:`HEAD_NAMES`)."""
    return name.split(".")[0] in HEAD_NAMES


def matches_target(name: str, target_modules: TargetSpec, head: bool = False) -> bool:
    """Whether ``target_modules`` selects the linear module with qualified ``name``.

    Args:
        name: the module's qualified name (``model.layers.0.self_attn.q_proj``).
        target_modules: ``"all-linear"`` (every linear module but an output head), a regex
            string (full match against ``name``), or a list of names or suffixes (an entry
            matches ``name`` itself or ``name`` ending in ``"." + entry``).
        head: the module is the model's output head (only ``"all-linear"`` reads it).

    Raises:
        re.error: ``target_modules`` is a string that is not a valid regex.
    """
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return not head
        return re.fullmatch(target_modules, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in target_modules)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``/``Conv1D`` (bitsandbytes' 4/8-bit layers subclass ``nn.Linear``), or a
    peftlab wrapper around one."""
    base = getattr(module, "base_layer", None)
    return isinstance(module, LINEAR_TYPES) or (base is not None and isinstance(base, LINEAR_TYPES))


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the insides of peftlab wrappers (a wrapped layer is
    seen under its original name), so a second adapter targets the same places."""
    out: list[tuple[str, nn.Module]] = []
    inside: str | None = None
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        out.append((name, module))
        if getattr(module, "base_layer", None) is not None:
            inside = name + "."
    return out


def is_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (Gemma's scaled one subclasses it), or a peftlab wrapper around one."""
    return isinstance(getattr(module, "base_layer", module), nn.Embedding)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every linear module in ``model``."""
    return [n for n, m in named_modules(model) if is_linear(m)]


def head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that ``all-linear`` excludes."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in named_modules(model):
        if out is not None and (module is out or getattr(module, "base_layer", None) is out):
            heads.add(name)
        if is_head_name(name):
            heads.add(name)
    return heads


def _suffix_summary(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n.rsplit(".", 1)[-1]] = counts.get(n.rsplit(".", 1)[-1], 0) + 1
    return ", ".join(f"{k} (×{v})" for k, v in counts.items())


def find_targets(
    model: nn.Module, target_modules: TargetSpec, embeddings: bool = False
) -> list[str]:
    """Resolve ``target_modules`` to the qualified names of linear modules in ``model`` (and
    of embedding tables, named explicitly, with ``embeddings``: LoRA adapts those too).

    Args:
        model: the model to search.
        target_modules: ``"all-linear"`` (every Linear/Conv1D but the output head), a regex
            string (full match against the qualified name), or a list of names or suffixes
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).

    Raises:
        ConfigError: an entry matches nothing, or matches a module that is not linear (nor,
            with ``embeddings``, an embedding); the message lists the model's linear modules.
    """
    linears = linear_names(model)
    available = f"the model's linear modules are: {_suffix_summary(linears) or 'none'}"
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            heads = head_names(model)
            found = [n for n in linears if matches_target(n, ALL_LINEAR, head=n in heads)]
            if not found:
                raise ConfigError(f"target_modules='all-linear' matched nothing; {available}")
            return found
        check_regex(target_modules)
        found = [n for n, _ in named_modules(model) if matches_target(n, target_modules)]
        if not found:
            raise ConfigError(
                f"target_modules regex {target_modules!r} matched no module; {available}"
            )
        _check_linear(model, found, available, embeddings)
        return found

    found: list[str] = []
    names = [n for n, _ in named_modules(model)]
    for entry in target_modules:
        hits = [n for n in names if matches_target(n, [entry])]
        if not hits:
            raise ConfigError(
                f"target module {entry!r} matches no module in the model; {available}"
            )
        found.extend(h for h in hits if h not in found)
    _check_linear(model, found, available, embeddings)
    return found


def check_target_modules(target_modules: object) -> None:
    """Raise :class:`ConfigError` unless ``target_modules`` is a non-empty list of names, a
    regex or "all-linear" (a config's check; whether it matches is :func:`find_targets`')."""
    check(
        isinstance(target_modules, str | list | tuple) and len(target_modules) > 0,
        "target_modules",
        target_modules,
        'a module name list, a regex, or "all-linear"',
    )


def check_regex(target_modules: str) -> None:
    """Raise :class:`ConfigError` when the string ``target_modules`` is not a valid regex."""
    try:
        re.compile(target_modules)
    except re.error as e:
        raise ConfigError(f"target_modules={target_modules!r} is not a valid regex: {e}") from e


def _check_linear(
    model: nn.Module, names: Sequence[str], available: str, embeddings: bool = False
) -> None:
    modules = dict(model.named_modules())
    bad = [
        n for n in names if not (is_linear(modules[n]) or (embeddings and is_embedding(modules[n])))
    ]
    if bad:
        listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in bad[:5])
        hint = (
            " (embedding tables take LoRA and QLoRA adapters only)"
            if not embeddings and any(is_embedding(modules[n]) for n in bad)
            else ""
        )
        raise ConfigError(
            f"target_modules matched modules that are not linear layers: {listed}"
            f"{' …' if len(bad) > 5 else ''}{hint}; {available}"
        )


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
