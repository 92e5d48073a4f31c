"""Method configs: flat dataclasses that validate themselves and round-trip through JSON/YAML.

Every method's config subclasses :class:`MethodConfig` once and sets ``method`` to its registry
name. Attribute docstrings are the help text; ``__post_init__`` rejects bad values with a
message that says what was wrong and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {key} must be {allowed}.")


@dataclasses.dataclass
class MethodConfig:
    """Base of every method config. Subclasses are flat dataclasses."""

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    """Whether the method's update can be folded into the base weights."""
    preserves_output_at_init: ClassVar[bool] = True
    """Whether the adapted model computes exactly the base model's function right after apply."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter, e.g. ["classifier"] for a new
    classification head (names or suffixes)."""

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

    if "method" not in d:
        raise ConfigError("a method config needs a 'method' key, e.g. {'method': 'lora', 'r': 8}")
    return get_method(d["method"]).config_cls.from_dict(d)


def load_config(path: str | Path) -> MethodConfig:
    """Read a method config from a .json or .yaml file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        return config_from_dict(yaml.safe_load(text))
    return config_from_dict(json.loads(text))
