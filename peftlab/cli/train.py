"""``peftlab train``: train from a YAML config with ``key=value`` overrides, or resume a run.

Exit status: 0 done, 2 bad input (see :mod:`peftlab.cli`), 3 training diverged.
"""

from __future__ import annotations

import argparse
import json
import os

from peftlab.core.config import ConfigError
from peftlab.train.loop import TrainingDiverged, train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a method on a model from a YAML config",
        description="Train from CONFIG.yaml with key=value overrides (dotted keys reach into "
        "method_args: method_args.r=8), or continue a run with --resume OUTPUT_DIR.",
    )
    p.add_argument("config", nargs="?", help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    p.add_argument(
        "--resume",
        metavar="OUTPUT_DIR",
        help="continue the run in OUTPUT_DIR from its newest checkpoint",
    )
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        if args.config:  # `train --resume DIR k=v`: argparse put the first override in `config`
            overrides.insert(0, args.config)
        source = args.resume
        if os.path.isfile(source):  # the library reads a YAML path here; the CLI says OUTPUT_DIR
            raise ConfigError(
                f"--resume {source} is a file, not a run directory; give the run's output_dir "
                f"(it holds config.yaml), or start a run from a config with: peftlab train {source}"
            )
    elif args.config:
        source = args.config
    else:
        raise ConfigError("give a config file (peftlab train CONFIG.yaml) or --resume OUTPUT_DIR")
    try:
        summary = train(source, overrides, resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"peftlab train: {e}", flush=True)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
        keys = ("output_dir", "steps", "final_loss", "eval_before", "eval_after", "test")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0
