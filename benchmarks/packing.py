"""Training throughput with sequence packing vs right-padded batches, side by side, on Alpaca.

    python -m benchmarks.packing                              # batch 8 × 512, 3 repeats
    python -m benchmarks.packing --steps 2 --warmup 1 --repeats 1 --examples 200   # a smoke run
    python -m benchmarks.packing --config packed              # one worker, prints RESULT json

Both configurations train SmolLM2-135M (``smollm2-135m``) with peftlab LoRA (r 8, all linear
layers) through the trainer itself (``peftlab.train.train``) on the first ``--examples``
records of the shuffled Alpaca data (``/work/shared/data/alpaca``, see its SOURCE.md), at
``max_length`` ``--seq`` and ``--batch`` rows per step: "padded" right-pads each micro-batch
to its longest example (the trainer's default), "packed" sets ``packing: true`` (rows of up
to ``--seq`` tokens holding several examples, peftlab/data/packing.py). Each configuration
runs in its own process, in a new shuffled order every repeat (benchmarks/harness.py).

Throughput: ``tokens_per_s`` is the examples' tokens (padding excluded) of the ``--steps``
timed steps over their wall-clock time, after ``--warmup`` untimed ones; a callback
synchronizes the device at every step end, so the times are exact on CUDA too. The ratio
packed / padded is taken within each repeat (the machine's load hits both sides of a pair)
and its median and range over repeats are printed, with the target of 1.8×.
``padding_fraction`` is the padding's share of the token slots of all steps (warm-up
included), from the run summary's ``token_counts``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import fmt, paired_ratio

CONFIGS = {"padded": False, "packed": True}  # name → packing
ALPACA = Path("/work/shared/data/alpaca/alpaca_data.json")
TARGET = 1.8


class _Clock:
    """A trainer callback: the device-synchronized time of every step end."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, model) -> None:
        self.ends.append(self._now())

    def on_step_end(self, record) -> None:
        self.ends.append(self._now())
        self.tokens.append(record.tokens)

    def on_train_end(self, model) -> None:
        pass


def _tiny(tokenizer):
    """A 2-layer random Llama over ``tokenizer``'s vocabulary (smoke tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg)


def worker(args) -> dict:
    """Train one configuration for ``warmup + steps`` steps and return its throughput."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer would take a GPU it sees
    from peftlab.models import load_tokenizer
    from peftlab.train import train

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2-135m")
    model = _tiny(tokenizer) if args.model == "tiny" else None
    clock = _Clock(args.device)
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-packing-") as out:
        summary = train(
            {
                "model": "smollm2-135m" if args.model == "tiny" else args.model,
                "method": "lora",
                "method_args": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                "data": str(args.data),
                "data_size": args.examples,
                "eval_size": 0,
                "eval_before": False,
                "max_length": args.seq,
                "batch_size": args.batch,
                "max_steps": args.warmup + args.steps,
                "lr": 1e-4,
                "packing": CONFIGS[args.config],
                "mixed_precision": "bf16" if args.dtype == "bf16" else "no",
                "progress": False,
                "output_dir": str(Path(out) / "run"),
            },
            model=model,
            tokenizer=tokenizer if model is not None else None,
            callbacks=[clock],
        )
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])][args.warmup :]
    tokens = clock.tokens[args.warmup :]
    counts = summary["token_counts"]
    return {
        "config": args.config,
        "tokens_per_s": sum(tokens) / sum(times),
        "step_s": statistics.median(times),
        "tokens_per_step": statistics.median(tokens),
        "padding_fraction": counts["padding_fraction"],
        "padded_tokens": counts["padded"],
        "real_tokens": counts["real"],
        "train_examples": summary["train_examples"],
        "packed_rows": summary["packed_rows"],
        "final_loss": summary["final_loss"],
        "device": summary["device"],
    }


def report(med: dict, raw: dict | None = None, out=print) -> list:
    """Print each configuration's throughput (median, range) and padding, then the ratio."""
    out(f"\n{'config':<8} {'tokens/s':>10} {'range':>19} {'step s':>8} {'padding':>8}  n")
    for name, m in med.items():
        runs = [r for r in (raw or {}).get(name, []) if "tokens_per_s" in r]
        spread = [r["tokens_per_s"] for r in runs]
        span = f"{min(spread):.0f}–{max(spread):.0f}" if spread else "—"
        out(
            f"{name:<8} {fmt(m.get('tokens_per_s'), '.0f'):>10} {span:>19} "
            f"{fmt(m.get('step_s'), '.3f'):>8} {fmt(m.get('padding_fraction'), '.1%'):>8}  "
            f"{m.get('n')}" + (f"  {m['error']}" if m.get("error") else "")
        )
    pairs = [
        x["tokens_per_s"] / y["tokens_per_s"]
        for x, y in zip((raw or {}).get("packed", []), (raw or {}).get("padded", []))
        if "tokens_per_s" in x and "tokens_per_s" in y
    ]
    r = paired_ratio(raw, "packed", "padded", "tokens_per_s")
    verdict = "n/a" if r is None else ("PASS" if r >= TARGET else "MISS")
    each = ", ".join(f"{p:.2f}×" for p in pairs) or "—"
    out(
        f"\npacked / padded tokens/s: {fmt(r, '.2f')}× (per repeat: {each}); target ≥ {TARGET}× {verdict}"
    )
    return [("packed/padded tokens_per_s", r, pairs)]


def parse_args(argv=None):
    p = harness.arg_parser(__doc__, list(CONFIGS), batch=8, dtypes=["fp32", "bf16"])
    p.set_defaults(seq=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--examples", type=int, default=2000, help="Alpaca records read")
    p.add_argument("--data", type=Path, default=ALPACA, help="the Alpaca JSON file")
    return p.parse_args(argv)


def worker_args(args) -> list[str]:
    keys = ("model", "device", "dtype", "batch", "seq", "warmup", "steps", "threads", "examples")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))] + ["--data", str(args.data)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: the Alpaca data {args.data} is not here (pass --data FILE)")
        return 0
    if args.config:
        if args.config not in CONFIGS:
            print(f"unknown --config {args.config!r}; choose from {', '.join(CONFIGS)}")
            return 2
        print(harness.RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    return harness.run_driver("packing", args, list(CONFIGS), worker_args(args), report)


if __name__ == "__main__":
    sys.exit(main())
