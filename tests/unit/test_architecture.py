"""The arrows between peftlab's parts (docs/architecture.md), checked on the source.

Every ``import`` statement counts — at module level and inside functions alike — because a
lazy import is still a dependency: it only moves the failure from import time to call time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "peftlab"

# part → parts it must never import. "peftlab" (the package itself) pulls in everything the
# package __init__ registers, so the lower parts may not import it either.
FORBIDDEN = {
    "core": {"methods", "train", "bench", "select", "cli", "data", "export", "peftlab"},
    "methods": {"train", "bench", "select", "cli", "export", "peftlab"},
    "data": {"methods", "train", "bench", "select", "cli", "export"},
    "train": {"bench", "cli", "select"},
    "select": {"bench", "cli", "train"},
    "bench": {"cli"},
    "export": {"bench", "cli", "select"},
    # The compare results' schema: read by bench (which writes it) and by select (which reads
    # measured results), so it depends on nothing of peftlab's.
    "results": {"core", "methods", "data", "models", "train", "bench", "select", "cli", "export"},
}


def _part(module: str) -> str:
    """The part of a dotted ``peftlab.*`` module name ("core", "methods", ...; "peftlab" for
    the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "peftlab"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported peftlab module) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "peftlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "peftlab":
                continue
            if mod == "peftlab":  # `from peftlab import x`: x may be a subpackage
                out += [(node.lineno, f"peftlab.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module_name(path)
        part = _part(me)
        for line, target in _imports(path):
            tpart = _part(target)
            if tpart == "peftlab" and target != "peftlab":
                continue
            if tpart in FORBIDDEN.get(part, set()) and tpart != part:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {part} imports {target}")
    return bad


def test_no_forbidden_arrows():
    assert _violations() == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from peftlab.bench import measure\n", ["core imports peftlab.bench"]),
        ("def f():\n    import peftlab.methods.lora\n", ["core imports peftlab.methods.lora"]),
        ("from peftlab import select\n", ["core imports peftlab.select"]),
        ("from peftlab.core.config import check\n", []),
    ],
)
def test_checker_sees_module_and_function_level_imports(tmp_path, monkeypatch, source, expected):
    # A fake tree with one core module: the checker must flag exactly the forbidden import.
    fake = tmp_path / "peftlab"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "x.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert [v.split(": ", 1)[1] for v in _violations()] == expected
