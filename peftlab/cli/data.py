"""``peftlab data inspect CONFIG [key=value ...]``: what a training config will learn from.

Reads the data exactly as ``peftlab train`` would (the model's tokenizer and kind, the same
splits, truncation and drops) without loading the model, and prints
:func:`peftlab.data.inspect.format_report` (or the report as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="inspect the data a training config reads",
        description="Tools for the data of a training config.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = actions.add_parser(
        "inspect",
        help="counts, length percentiles and one example with its loss tokens marked",
        description="Read the data of CONFIG.yaml as `peftlab train` would and print how many "
        "examples were read, truncated and dropped per split, token-length percentiles, labels, "
        "sources, and one training example with the tokens that carry loss marked «...».",
    )
    i.add_argument("config", help="YAML training config (see configs/)")
    i.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    i.add_argument("--example", type=int, default=0, help="training example to render (index)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument(
        "--sample",
        type=_positive,
        default=1000,
        help="streaming configs: training examples read (default 1000); the file is not read "
        "through",
    )
    i.set_defaults(func=_inspect)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1, e.g. --sample 1000")
    return int(text)


def _inspect(args: argparse.Namespace) -> int:
    from peftlab.data.inspect import format_report, inspect_data
    from peftlab.models import load_tokenizer, model_kind
    from peftlab.train.config import TrainConfig

    cfg = TrainConfig.load(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    report = inspect_data(
        tokenizer,
        cfg.data,
        model_kind(cfg.model),
        cfg.max_length,
        example=args.example,
        streaming=cfg.streaming,
        shuffle_buffer=cfg.shuffle_buffer,
        sample=args.sample,
        **cfg.data_kwargs(),
    )
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0
