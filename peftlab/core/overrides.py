"""``key=value`` overrides: the one parser behind ``peftlab train CONFIG key=value`` and
``peftlab compare --set METHOD.OPTION=VALUE`` / ``--train KEY=VALUE``.

An item is ``KEY=VALUE``, split at the first ``=``:

- ``KEY`` is one or more non-empty names joined by dots; each dot reaches one mapping deeper
  (``method_args.r=8`` sets ``d["method_args"]["r"]``, creating the mapping when missing).
- ``VALUE`` is read as YAML, so it is typed: ``1e-3`` → float, ``8`` → int, ``true`` → bool,
  ``null`` → None, ``[q_proj,v_proj]`` → list. An empty value (``key=``) is the empty string.
  Exponents without a dot (``1e-3``, ``2e1``) are floats, as in YAML 1.2 (PyYAML's YAML 1.1
  would read them as strings).

A malformed item is a one-line :class:`ConfigError` naming the item and the form expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

from peftlab.core.config import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-3``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_item(
    item: str,
    *,
    what: str = "override",
    form: str = "key=value",
    example: str = "lr=1e-3 or method_args.r=8",
    min_depth: int = 1,
) -> tuple[list[str], Any]:
    """Split one ``KEY=VALUE`` item into its dotted key parts and its YAML-typed value.

    Args:
        item: the text as given on the command line.
        what: how the error names the item's source (``"override"``, ``"--set"``).
        form: the expected form, as the error states it.
        example: a valid item, as the error shows it.
        min_depth: the fewest dotted parts the key must have (2 for ``METHOD.OPTION``).

    Raises:
        ConfigError: no ``=``, an empty key part, too few parts, or a value that is not YAML.
    """
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts) or len(parts) < min_depth:
        raise ConfigError(f"{what} {item!r} must look like {form}, e.g. {example}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw else ""  # _Loader is a SafeLoader
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(
            f"{what} {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it, "
            f"e.g. {key}='{raw}'"
        ) from None
    if value is None and raw.strip().startswith("#"):
        # YAML reads "#1 String" as a comment, i.e. null; on a command line it is text
        # (MRPC's column is named "#1 String").
        value = raw.strip()
    return parts, value


def apply_overrides(d: dict[str, Any], items: Iterable[str], **naming: Any) -> dict[str, Any]:
    """``d`` with every item set, in order; ``d`` itself and its nested mappings stay unchanged.

    Args:
        d: the mapping to start from (e.g. a loaded YAML config).
        items: ``KEY=VALUE`` strings (see the module docstring).
        **naming: ``what``, ``form``, ``example``, ``min_depth`` of :func:`parse_item`.

    Raises:
        ConfigError: a malformed item, or a dotted key that reaches into a value that is not a
            mapping (``lr.x=1`` when ``lr`` is a number).
    """
    out = dict(d)
    for item in items:
        parts, value = parse_item(item, **naming)
        node = out
        for depth, p in enumerate(parts[:-1], 1):
            child = node.get(p)
            if child is not None and not isinstance(child, dict):
                prefix = ".".join(parts[:depth])
                raise ConfigError(
                    f"{naming.get('what', 'override')} {item!r}: {prefix} is {child!r}, not a "
                    f"mapping, so {'.'.join(parts)} cannot be set"
                )
            node[p] = dict(child or {})  # a copy: the caller's nested mappings stay unchanged
            node = node[p]
        node[parts[-1]] = value
    return out


def parse_overrides(items: Iterable[str], **naming: Any) -> dict[str, Any]:
    """The nested mapping that ``items`` describe (:func:`apply_overrides` on ``{}``)."""
    return apply_overrides({}, items, **naming)
