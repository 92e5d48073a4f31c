"""Method configs: flat dataclasses that validate themselves and round-trip through JSON/YAML.

Every method's config subclasses :class:`MethodConfig` once and sets ``method`` to its registry
name. Attribute docstrings are the help text; ``__post_init__`` rejects bad values with a
message that says what was wrong and what is allowed.

Configs are frozen: ``replace()`` returns a new one, so a config passed to ``apply`` is never
changed behind the caller's back. Every field is type-checked against its annotation by
:func:`check_fields`, which :meth:`MethodConfig.__post_init__` calls (a subclass's own
``__post_init__`` calls it first and then checks values) and so does the training config
(:class:`peftlab.train.TrainConfig`): ``bool`` takes only true/false, ``int`` only integers
(not booleans), ``float`` only finite numbers, ``str`` only strings, ``dict`` only mappings,
``list[str]`` only lists of strings (a method config keeps it as a tuple inside, written back
as a list by ``to_dict``), and ``None`` only where the annotation allows it.

One string is read as a number: for a ``float``, a string in exponent form without a dot
(``"1e-3"``, ``"2E+4"``). PyYAML follows YAML 1.1, which reads ``lr: 1e-3`` as the string
``"1e-3"``; YAML 1.2 (and peftlab's ``key=value`` overrides, :mod:`peftlab.core.overrides`)
read it as the number, and so does this check. Every other string for a number (``"0.1"``,
``"8"``, ``"abc"``) is refused: in a YAML file it can only have been quoted.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {key} must be {allowed}.")


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, in words ("an integer", "a list of strings")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): "null",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def _kind(value: Any) -> str:
    """The kind of a wrong value, in words, for the error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "infinite"
    if isinstance(value, dict):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


_NO = object()
""":func:`_conform`'s answer for a value that does not fit the type."""

YAML11_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
"""Floats that YAML 1.1 (PyYAML) leaves as strings and YAML 1.2 reads as numbers: ``1e-3``."""


def _conform(value: Any, hint: Any, tuples: bool = True) -> Any:
    """``value`` if it is of type ``hint``, else :data:`_NO`. A list comes back as a tuple when
    ``tuples``; a :data:`YAML11_FLOAT` string for a ``float`` comes back as the number.

    Types it does not know (none of peftlab's configs use others) accept any value.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            out = _conform(value, arm, tuples)
            if out is not _NO:
                return out
        return _NO
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return _NO
        items = [_conform(v, args[0], tuples) for v in value]
        if any(v is _NO for v in items):
            return _NO
        if tuples:
            return tuple(items)
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if origin is dict and args:
        if not isinstance(value, dict):
            return _NO
        pairs = [
            (_conform(k, args[0], tuples), _conform(v, args[1], tuples)) for k, v in value.items()
        ]
        if any(x is _NO for p in pairs for x in p):
            return _NO
        same = all(a is k and b is v for (a, b), (k, v) in zip(pairs, value.items()))
        return value if same else dict(pairs)
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        if isinstance(value, str) and YAML11_FLOAT.match(value):
            value = float(value.replace("_", ""))
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return value if ok and math.isfinite(value) else _NO
    if hint is type(None):
        return value if value is None else _NO
    if isinstance(hint, type) and hint in (str, dict):
        return value if isinstance(value, hint) else _NO
    return value


def check_fields(obj: Any, *, tuples: bool = True) -> None:
    """Check every field of the dataclass ``obj`` against its annotation (see the module
    docstring) and store the values :func:`_conform` normalised.

    Args:
        obj: a dataclass instance, frozen or not.
        tuples: keep lists as tuples (frozen, hashable configs); False keeps them lists.

    Raises:
        ConfigError: the first field whose value does not fit, naming the key, the value, what
            is allowed and what was given ("r=True is invalid: r must be an integer, not a
            boolean.").
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out = _conform(value, hints[f.name], tuples)
        if out is _NO:
            allowed = _describe(hints[f.name])
            check(False, f.name, value, f"{allowed}, not {_kind(value)}")
        if out is not value:
            object.__setattr__(obj, f.name, out)  # setattr refuses on a frozen dataclass


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are flat, frozen dataclasses whose own
    ``__post_init__`` (if any) calls ``super().__post_init__()`` first."""

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    """Whether the method's update can be folded into the base weights."""
    preserves_output_at_init: ClassVar[bool] = True
    """Whether the adapted model computes exactly the base model's function right after apply."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new
    classification head (names or suffixes). None: a classification model's new head
    (``classifier``/``score``) trains; [] trains nothing besides the method's parameters."""

    def __post_init__(self) -> None:
        """Check every field against its annotation (see the module docstring)."""
        check_fields(self)  # lists are kept as tuples: the config is frozen and hashable

    def with_tokenizer(self, tokenizer: Any) -> MethodConfig:
        """This config with whatever it needs from the tokenizer resolved (a virtual-token
        method's ``init_text`` becomes ``init_token_ids``); most methods need nothing."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values, with its ``method`` name first."""
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        """Build from a dict; unknown keys are an error that lists the known ones."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"a {cls.method!r} config must be a mapping of option names to values, "
                f"not {type(d).__name__} {d!r}"
            )
        d = {k: v for k, v in d.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method {cls.method!r}; "
                f"known options: {sorted(known)}"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> MethodConfig:
        """A new config with ``changes`` applied (validated again); this one is unchanged."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → attribute docstring (the help text), read from the class source."""
        out: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if not dataclasses.is_dataclass(klass) or klass is object:
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            except (OSError, TypeError, SyntaxError):
                continue
            body = tree.body[0].body  # type: ignore[attr-defined]
            for node, nxt in zip(body, body[1:]):
                if (
                    isinstance(node, ast.AnnAssign)
                    and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    out[node.target.id] = " ".join(nxt.value.value.split())
        fields = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in out.items() if k in fields}


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Build the config of the method named by ``d["method"]``."""
    from peftlab.core.registry import get_method

    if not isinstance(d, dict):
        raise ConfigError(
            f"a method config must be a mapping with a 'method' key, e.g. "
            f"{{'method': 'lora', 'r': 8}}; got {type(d).__name__} {d!r}"
        )
    if "method" not in d:
        raise ConfigError("a method config needs a 'method' key, e.g. {'method': 'lora', 'r': 8}")
    check(isinstance(d["method"], str), "method", d["method"], "a method name such as 'lora'")
    return get_method(d["method"]).config_cls.from_dict(d)


def load_config(path: str | Path) -> MethodConfig:
    """Read a method config from a .json or .yaml file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        return config_from_dict(yaml.safe_load(text))
    return config_from_dict(json.loads(text))
