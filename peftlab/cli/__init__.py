"""``peftlab`` command line: a thin map from subcommands to library functions.

Each subcommand is one module of this package with ``add_parser(subparsers)``, which adds the
subcommand and sets ``func`` to a function that maps the parsed arguments onto one library
call and prints its result. All argparse code lives here; the library never parses argv.

Errors: a user error (bad config, bad data, a missing or unwritable path, a model that does
not load) prints one line ``peftlab <command>: error: ...`` and exits 2; Ctrl-C exits 130
with one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Modules that add one subcommand each (recommend adds recommend and estimate), in help order.
SUBCOMMANDS = [
    "peftlab.cli.methods",
    "peftlab.cli.demo",
    "peftlab.cli.compare",
    "peftlab.cli.train",
    "peftlab.cli.recommend",
    "peftlab.cli.data",
    "peftlab.cli.export",
    "peftlab.cli.combine",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning for Hugging Face transformers: "
        "apply, train, compare and choose PEFT methods.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # keep the other subcommands usable
            print(f"peftlab: subcommand module {module} failed to import: {e}", file=sys.stderr)
            continue
        mod.add_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: one line and exit 2."""
    from yaml import YAMLError  # a config file or a key=value that is not valid YAML

    from peftlab.core.config import ConfigError
    from peftlab.core.io import AdapterFileError
    from peftlab.data import DataError
    from peftlab.models import ModelLoadError
    from peftlab.train.metrics import MetricError

    # OSError covers the path errors: FileNotFoundError, FileExistsError, NotADirectoryError
    # (a parent that is a file), IsADirectoryError, PermissionError (an unwritable directory).
    return (
        ConfigError,
        DataError,
        AdapterFileError,
        ModelLoadError,
        MetricError,
        YAMLError,
        OSError,
    )


def _one_line(e: BaseException) -> str:
    """The message on one line (a library's OSError may span several)."""
    text = _path_error(e) if isinstance(e, OSError) else None
    text = text or str(e)
    return " ".join(s.strip() for s in text.splitlines() if s.strip()) or type(e).__name__


def _path_error(e: OSError) -> str | None:
    """An OSError about a path, said as the path, the problem and its cause on the disk: the
    file that stands where a directory is needed, the directory that cannot be written. None
    for one that names no path (its own message is the clearest then)."""
    if not e.filename or not e.strerror:
        return None
    path = Path(e.filename)
    said = f"{path}: {e.strerror}"
    if isinstance(e, NotADirectoryError | FileExistsError):
        # Creating a directory (mkdir, the output directories) where a file already stands.
        blocker = next((p for p in [path, *path.parents] if p.is_file()), None)
        if blocker == path:
            return f"{path} is a file, not a directory; give a directory"
        if blocker is not None:
            return f"{said}: its parent {blocker} is a file"
    if isinstance(e, PermissionError):
        near = next((p for p in path.parents if p.exists()), None)
        if near is not None and not os.access(near, os.W_OK | os.X_OK):
            return f"{said}: the directory {near} is not writable by this user"
    return said


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"peftlab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
