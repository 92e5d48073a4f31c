"""``peftlab export``: a trained run → a merged HF model, a GGUF file or a peft adapter,
verified against base + adapter (see :mod:`peftlab.export`)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained adapter as a merged HF model, a GGUF file or a peft adapter",
        description="Export RUN_DIR (or an adapter directory, or a compare output with --run) "
        "to --format hf|gguf|peft in --out, then reload the export the way a user would and "
        "check it against base + adapter on the same prompts (export_report.json); an export "
        "outside tolerance is an error and nothing is kept.",
    )
    p.add_argument(
        "source", metavar="RUN_DIR", help="run directory, adapter directory or compare output"
    )
    # Values are checked by peftlab.export (one-line errors naming what is allowed).
    p.add_argument("--format", required=True, help="hf (merged model), gguf or peft (adapter)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--dtype", help="hf weight dtype: f32 (default), bf16 or f16")
    p.add_argument(
        "--quant", metavar="TYPE", help="gguf tensor type: f32, f16 (default), bf16 or q8_0"
    )
    p.add_argument(
        "--model", metavar="BASE", help="base model, overriding the one the source names"
    )
    p.add_argument("--run", metavar="NAME", help="the run of a compare output to export")
    p.add_argument(
        "--no-verify", action="store_true", help="skip reloading and checking the export"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="a verification prompt (repeatable; default: 16 built-in prompts)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="hf safetensors shard size (default 5GB)"
    )
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from peftlab.export import ExportVerificationError, export

    try:
        report = export(
            args.source,
            args.format,
            args.out,
            dtype=args.dtype,
            quant=args.quant,
            verify=not args.no_verify,
            prompts=args.prompts,
            model=args.model,
            run=args.run,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    except ExportVerificationError as e:
        print(f"peftlab export: {e}", file=sys.stderr)
        return 1
    for warning in report["warnings"]:
        print(f"peftlab export: warning: {warning}", file=sys.stderr)
    for check in report.get("checks", []):
        print(
            f"verified ({check['check']}): max rel logit diff {check['max_rel_logit_diff']:.2e}, "
            f"top-1 {check['top1_agreement']:.1%}, greedy {check['greedy_agreement']:.1%}"
        )
    print(f"{args.format} export ({report['precision']}) written to {args.out}")
    return 0
