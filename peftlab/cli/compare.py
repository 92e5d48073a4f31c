"""``peftlab compare``: every method on the same model, data, budget and seeds, each at its own
learning rate (or its own tuned setting with ``--tune``); one JSON per run and a report.
Exit status: 0 every run ok, 1 some run failed, 2 bad input."""

from __future__ import annotations

import argparse

from peftlab.bench.runner import DEFAULT_MODEL, FULL, QUICK, compare
from peftlab.core.config import ConfigError
from peftlab.core.overrides import parse_overrides


def _method_args(items: list[str]) -> dict[str, dict]:
    """``["lora.r=16", "adapter.bottleneck=32"]`` → ``{"lora": {"r": 16}, "adapter": {...}}``."""
    return parse_overrides(
        items, what="--set", form="METHOD.OPTION=VALUE", example="lora.r=16", min_depth=2
    )


def _train_overrides(items: list[str]) -> dict:
    """``["data_size=2000", "text_column=sentence"]`` → ``{"data_size": 2000, ...}``."""
    return parse_overrides(items, what="--train", form="KEY=VALUE", example="data_size=2000")


def _tune_keys(text: str | None) -> tuple[str, ...]:
    """``"lr,r"`` → ``("lr", "r")``; an empty key is an error."""
    if text is None:
        return ()
    keys = tuple(k.strip() for k in text.split(","))
    if not all(keys):
        raise ConfigError(f"--tune {text!r} is invalid: give comma-separated keys, e.g. lr,r")
    return keys


def _add_settings(p: argparse.ArgumentParser) -> None:
    """Budget sizes, learning rates and the search."""
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument(
        "--lr",
        type=float,
        help="one learning rate for every method (default: each method's own prior: "
        "low-rank 1e-3, IA3, LoHa and LoKr 3e-3, prompt and P-Tuning v2 1e-2, VeRA 3e-2, "
        "Prefix-Tuning 3e-4, full fine-tuning 5e-5); a classification head trains at "
        "--train head_lr (default 1e-2) either way",
    )
    p.add_argument(
        "--lr-full",
        type=float,
        help="learning rate of methods that train the base weights (full fine-tuning), over "
        "--lr and the prior",
    )
    p.add_argument(
        "--tune",
        metavar="KEYS",
        help="search each method's own grid for these comma-separated keys on the validation "
        "split (successive halving, ~2-3x one run), then measure the chosen setting: lr, r, "
        "bottleneck, num_virtual_tokens, ... (a method without a key is tuned on the others)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train every method on the same model and data, measure, and write a report",
        description="Train each method in its own process on the same model, data, token budget "
        "and seeds, each at its own learning rate (or its own tuned setting with --tune); "
        "measure trainable parameters, adapter size, peak memory, speed, inference overhead, "
        "stability and quality (mean ± 95% interval over seeds, against the majority class and "
        "the untrained model); write <method>.json per run, report.md and report.html. Compare "
        "writes only its own files and compare-runs/ in --out. Rerun the same command to resume.",
    )
    p.add_argument(
        "--methods", help="comma-separated registry names (default: all that apply to the model)"
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="bundled name, HF directory or .gguf file"
    )
    p.add_argument("--data", help="builtin:<task> or a data file (default: a built-in task)")
    p.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps per run (default {FULL.steps}; {QUICK.steps} with --quick)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="runs per method, seeds 0..K-1: every figure is a mean ± 95%% interval over them "
        "(default 3; 1 with --quick)",
    )
    p.add_argument("--out", default="compare-out", help="output directory; rerun to resume")
    p.add_argument(
        "--quick", action="store_true", help="small budget: a few minutes on a 2-core CPU"
    )
    _add_settings(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.OPTION=VALUE",
        help="method option, e.g. --set lora.r=16 (repeatable)",
    )
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training-config key for every run, e.g. --train data_size=2000 "
        "--train eval_data=dev.tsv --train text_column=sentence (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: the cores other work leaves free, read before "
        "each run)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="methods run side by side (default 1); timings of a run beside another are "
        "marked unreliable, quality is not affected",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rewrite the report from the results already in --out",
    )
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds after which one run is stopped and recorded as failed",
    )
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> int:
    res = compare(
        methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None,
        model=a.model,
        data=a.data,
        steps=a.steps,
        seeds=a.seeds,
        out=a.out,
        quick=a.quick,
        retry_failed=a.retry_failed,
        timeout=a.timeout,
        batch_size=a.batch_size,
        max_length=a.max_length,
        lr=a.lr,
        lr_full=a.lr_full,
        tune=_tune_keys(a.tune),
        method_args=_method_args(a.set),
        train_overrides=_train_overrides(a.train),
        threads=a.threads,
        jobs=a.jobs,
        report_only=a.report_only,
    )
    return 0 if all(r["train_info"]["status"] == "ok" for r in res["results"]) else 1
