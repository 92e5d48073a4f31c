"""``peftlab`` command line: a thin map from subcommands to library functions.

Each subcommand lives next to the library code it calls, as ``add_<name>_parser(subparsers)``
that sets ``func`` to a function taking the parsed args; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs that add one subcommand each.
SUBCOMMANDS = [
    ("peftlab.cli.demo", "add_parser"),
    ("peftlab.bench.runner", "add_parser"),
    ("peftlab.train.loop", "add_parser"),
    ("peftlab.select.recommend", "add_parsers"),
    ("peftlab.cli.export", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning for Hugging Face transformers: "
        "apply, train, compare and choose PEFT methods.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    methods = sub.add_parser("methods", help="list the registered methods and their options")
    methods.set_defaults(func=_list_methods)
    for module, fn in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # keep the other subcommands usable
            print(f"peftlab: subcommand module {module} failed to import: {e}", file=sys.stderr)
            continue
        getattr(mod, fn)(sub)
    return parser


def _list_methods(args: argparse.Namespace) -> int:
    from peftlab.core.registry import get_method, methods

    for name in methods():
        cls = get_method(name).config_cls
        print(f"{name}  ({cls.__name__}): {(cls.__doc__ or '').strip().splitlines()[0]}")
        for field, text in cls.help().items():
            print(f"    {field}: {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from peftlab.core.config import ConfigError
    from peftlab.core.io import AdapterFileError
    from peftlab.models import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, AdapterFileError, ModelLoadError, FileExistsError, FileNotFoundError) as e:
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
