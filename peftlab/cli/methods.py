"""``peftlab methods``: the registered methods and their options."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered methods and their options")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from peftlab.core.registry import get_method, methods

    for name in methods():
        cls = get_method(name).config_cls
        print(f"{name}  ({cls.__name__}): {(cls.__doc__ or '').strip().splitlines()[0]}")
        for field, text in cls.help().items():
            print(f"    {field}: {text}")
    return 0
