"""``peftlab recommend`` (rank every method for a model, a budget and a task) and ``peftlab
estimate`` (the memory breakdown of one configuration)."""

from __future__ import annotations

import argparse
import json
import sys

from peftlab.core.config import ConfigError
from peftlab.select.devices import STRATEGIES
from peftlab.select.estimator import OPTIMIZER_BYTES, estimate_memory
from peftlab.select.recommend import TASKS, format_table, recommend


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``recommend`` and ``estimate``."""
    add_recommend_parser(subparsers)
    add_estimate_parser(subparsers)


def add_recommend_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recommend",
        help="rank every method for a model, a memory budget and a task (predicted memory)",
        # The recommender module's first docstring line, so the two never disagree.
        description=sys.modules[recommend.__module__].__doc__.splitlines()[0],
    )
    p.add_argument(
        "--model",
        required=True,
        help="preset (e.g. llama-2-13b), bundled name or local HF directory",
    )
    p.add_argument("--memory-gb", type=float, required=True, help="memory of each device in GB")
    p.add_argument("--task", default="generation", help=f"one of {', '.join(TASKS)}")
    p.add_argument(
        "--latency-critical", action="store_true", help="prefer methods with no inference overhead"
    )
    p.add_argument("--quality", default="high", help="highest | high | balanced")
    p.add_argument(
        "--results",
        help="a peftlab compare output directory: measured speed/quality replace priors",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--batch-size", type=int, default=16, help="effective batch size (micro-batch × grad accum)"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--optimizer", default="adamw", help=", ".join(OPTIMIZER_BYTES))
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    _add_devices(p, "default: DDP where it fits, else FSDP")
    p.add_argument("--json", action="store_true", help='print {"recommendations": [...]}')
    p.set_defaults(func=_recommend_cli)


def _recommend_cli(args: argparse.Namespace) -> int:
    recs = recommend(
        args.model,
        args.memory_gb,
        args.task,
        args.latency_critical,
        args.quality,
        args.results,
        args.seq_len,
        args.batch_size,
        args.dtype,
        args.optimizer,
        args.device,
        devices=args.devices,
        strategy=args.strategy,
    )
    if args.json:
        print(json.dumps({"recommendations": [r.to_dict() for r in recs]}, indent=2))
    else:
        print(format_table(recs))
    return 0


def add_estimate_parser(subparsers: argparse._SubParsersAction) -> None:
    """``peftlab estimate``: the memory breakdown of one configuration."""
    p = subparsers.add_parser(
        "estimate", help="predict the training/inference memory of one configuration"
    )
    p.add_argument("--model", required=True)
    p.add_argument(
        "--method",
        default="lora",
        help='method name or JSON config, e.g. \'{"method":"lora","r":16}\'',
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--device", default="cuda")
    _add_devices(p, "default: ddp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_estimate_cli)


def _add_devices(p: argparse.ArgumentParser, default: str) -> None:
    """``--devices N`` and ``--strategy``: the figures become one device's."""
    p.add_argument(
        "--devices", type=int, default=1, help="devices training runs on (memory per device)"
    )
    p.add_argument("--strategy", help=f"{' | '.join(STRATEGIES)} ({default})")


def _estimate_cli(args: argparse.Namespace) -> int:
    est = estimate_memory(
        args.model,
        _method(args.method),
        args.batch_size,
        args.seq_len,
        args.dtype,
        args.optimizer,
        args.gradient_checkpointing,
        args.attention,
        args.device,
        devices=args.devices,
        strategy=args.strategy,
    )
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.table())
    return 0


def _method(text: str) -> str | dict:
    """``--method``: a registry name, or a JSON config when it starts with ``{``."""
    if not text.strip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f'--method {text!r} is not valid JSON ({e}); write e.g. \'{{"method":"lora","r":16}}\''
        ) from None
