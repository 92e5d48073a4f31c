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
import sys

# Modules that add one subcommand each (recommend adds recommend and estimate), in help order.
SUBCOMMANDS = [
    "peftlab.cli.methods",
    "peftlab.cli.demo",
    "peftlab.cli.compare",
    "peftlab.cli.train",
    "peftlab.cli.recommend",
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

    # OSError covers the path errors: FileNotFoundError, FileExistsError, NotADirectoryError
    # (a parent that is a file), IsADirectoryError, PermissionError (an unwritable directory).
    return (ConfigError, DataError, AdapterFileError, ModelLoadError, YAMLError, OSError)


def _one_line(e: BaseException) -> str:
    """The message on one line (a library's OSError may span several)."""
    return " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__


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
