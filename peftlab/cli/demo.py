"""``peftlab demo``: apply a method to the bundled model (or ``--model DIR``), report its
trainable share, merge when the method is mergeable, and generate (:func:`peftlab.demo.run_demo`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="apply a method to the bundled model and generate")
    p.add_argument(
        "--model", default="smollm2-135m", help="bundled name or local HF directory of a causal LM"
    )
    p.add_argument("--method", default="lora", help="a registered method (see peftlab methods)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from peftlab.demo import run_demo

    run_demo(args.model, args.method)
    return 0
