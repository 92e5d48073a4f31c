"""``peftlab combine``: load adapters onto one base model, combine them
(:func:`peftlab.combine`), save the result, and optionally score each part and the
combination on each given eval set."""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path

from peftlab.core.config import ConfigError

BASE_ROW = "(base model)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "combine",
        help="combine LoRA/DoRA/QLoRA adapters into one (linear, cat, svd, ties, dare)",
        description="Load each adapter of --adapters onto --model, combine them with --method "
        "(docs/adapters.md has the formulas), save the result to --out, and with --eval-data "
        "print each part and the combination evaluated on each eval set.",
    )
    p.add_argument("--model", required=True, help="base model: bundled name, HF directory, .gguf")
    p.add_argument(
        "--adapters",
        required=True,
        metavar="NAME=DIR[:WEIGHT],...",
        help="adapters and their weights (default 1), e.g. a=runs/a/adapter:0.5,b=runs/b/adapter:0.5",
    )
    p.add_argument(
        "--method", default="linear", help="linear, cat, svd, ties, dare_linear or dare_ties"
    )
    p.add_argument("--density", type=float, help="fraction kept, in (0, 1] (ties, dare_*)")
    p.add_argument("--rank", type=int, help="rank of the result (svd, ties, dare_*)")
    p.add_argument("--seed", type=int, default=0, help="DARE's drop pattern (default 0)")
    p.add_argument("--name", default="combined", help="the combined adapter's name")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the adapter to")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--eval-data",
        nargs="+",
        default=[],
        metavar="SOURCE",
        help="eval sets (builtin:<task> or a data file) to score every part and the result on",
    )
    p.add_argument(
        "--eval-size", type=int, help="examples per eval set (default: all; built-in 500)"
    )
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    p.add_argument(
        "--exact-match",
        action="store_true",
        help="score exact match by greedy generation on data files too (on for built-in tasks)",
    )
    p.set_defaults(func=_cli)


def parse_adapters(spec: str) -> list[tuple[str, Path, float]]:
    """``a=DIR:0.5,b=DIR`` → ``[(name, dir, weight), ...]``; a bad entry is one line."""
    out = []
    for entry in spec.split(","):
        name, eq, rest = entry.partition("=")
        if not eq or not name.strip() or not rest:
            raise ConfigError(
                f"--adapters entry {entry!r} is invalid: each entry is NAME=DIR or NAME=DIR:WEIGHT"
            )
        path, weight = rest, "1"
        head, colon, tail = rest.rpartition(":")
        if colon and head and "/" not in tail and "\\" not in tail:
            path, weight = head, tail
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(
                f"--adapters entry {entry!r}: weight {weight!r} is not a number"
            ) from None
        if not math.isfinite(w):
            raise ConfigError(f"--adapters entry {entry!r}: weight {w} must be a finite number")
        if name.strip() in [n for n, _, _ in out]:
            raise ConfigError(f"--adapters names {name.strip()!r} twice; give each a new name")
        out.append((name.strip(), Path(path), w))
    return out


def _cli(args: argparse.Namespace) -> int:
    import peftlab
    from peftlab.models import load_model

    parts = parse_adapters(args.adapters)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty; pass --overwrite to replace it or choose "
            f"another directory"
        )
    if args.eval_size is not None and args.eval_size < 1:
        raise ConfigError(f"--eval-size={args.eval_size} is invalid: it must be at least 1")
    for name, path, _ in parts:
        if not path.is_dir():
            raise FileNotFoundError(f"--adapters {name}={path}: no such adapter directory")
    model = load_model(args.model).eval()
    for name, path, _ in parts:
        peftlab.load_adapter(model, path, adapter_name=name)
    result = peftlab.combine(
        model,
        {n: w for n, _, w in parts},
        args.method,
        density=args.density,
        rank=args.rank,
        seed=args.seed,
        new_name=args.name,
    )
    peftlab.save_adapter(
        model, out, adapter_name=result.name, overwrite=True, base_model_name_or_path=args.model
    )
    exact = "exact" if result.relative_error == 0 else f"relative error {result.relative_error:.2e}"
    print(
        f"{result.method} combination {result.name!r} (r={result.rank}, {exact}) written to {out}"
    )
    if args.eval_data:
        print(_eval_table(model, args, [n for n, _, _ in parts] + [result.name]))
    return 0


def _eval_table(model, args: argparse.Namespace, names: list[str]) -> str:
    """A text table: the base model (no adapter), then one row per adapter; per eval set its
    loss and accuracy/exact match with its 95% Wilson interval over the eval set's examples
    (every row is scored on the same examples: compare rows by their counts, not by
    overlapping intervals alone)."""
    import peftlab
    from peftlab.bench.baselines import wilson
    from peftlab.data import load_task_data
    from peftlab.models import load_tokenizer, model_kind
    from peftlab.train.evaluate import evaluate

    tokenizer, kind = load_tokenizer(args.model), model_kind(model)
    header, rows = ["adapter"], {n: [n] for n in [BASE_ROW, *names]}
    for source in args.eval_data:
        data = load_task_data(
            tokenizer,
            source,
            kind,
            args.max_length,
            eval_size=0,
            data_size=1,
            eval_data=source,
            test_size=args.eval_size,
        )
        exact = args.exact_match or source.startswith("builtin:")
        header.append(f"{source} loss")
        score = "accuracy" if data.kind == "classification" else "exact_match" if exact else None
        if score:
            header.append(f"{source} {score} (95% interval, n={len(data.test)})")
        for name in rows:
            if name != BASE_ROW:
                peftlab.set_adapter(model, name)
            base = peftlab.disable_adapters(model) if name == BASE_ROW else nullcontext()
            with base:
                m = evaluate(model, tokenizer, data, exact_match=exact, split="test")
            rows[name].append(f"{m['test_loss']:.4f}")
            if score:
                p = m[f"test_{score}"]
                low, high = wilson(p, len(data.test))
                rows[name].append(f"{p:.3f} ({low:.3f}-{high:.3f})")
    table = [header, *rows.values()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)
