"""Inference latency: base model vs unmerged and merged LoRA/DoRA, one process per config.

    python -m benchmarks.inference                       # driver: all configs, 3 repeats
    python -m benchmarks.inference --config peftlab-lora-unmerged   # one worker

Prefill: one forward of a batch of ``--batch`` × ``--seq`` tokens without cache (median of
``--reps``). Decode: greedy decoding of ``--new-tokens`` tokens one at a time with the KV
cache after a 16-token prompt; the figure is seconds per token (median over ``--reps``
rounds). Adapters get random non-zero B so the merged weights really differ from the base.
"merged" keeps peftlab's wrapper layers (``peftlab.merge``: the update folded into W0, the
adapter still there to unmerge); "unloaded" is ``merge_and_unload`` (plain modules again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from benchmarks import harness, loading
from benchmarks.harness import fmt, paired_ratio, ratio, verdict

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
# config name → (library, method, mode); mode ∈ {"base", "unmerged", "merged", "unloaded"}
CONFIGS = {
    "base": (None, None, "base"),
    "peftlab-lora-unmerged": ("peftlab", "lora", "unmerged"),
    "peftlab-lora-merged": ("peftlab", "lora", "merged"),
    "peftlab-lora-unloaded": ("peftlab", "lora", "unloaded"),
    "peftlab-dora-unmerged": ("peftlab", "dora", "unmerged"),
    "peftlab-dora-merged": ("peftlab", "dora", "merged"),
    "peft-lora-unmerged": ("peft", "lora", "unmerged"),
    "peft-dora-unmerged": ("peft", "dora", "unmerged"),
}


def build(args) -> nn.Module:
    lib, method, mode = CONFIGS[args.config]
    model = loading.load(args)
    if lib == "peftlab":
        import peftlab

        peftlab.apply(model, peftlab.config_from_dict({"method": method, **LORA}))
    elif lib == "peft":
        import peft

        cfg = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            use_dora=method == "dora",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, cfg)
    if lib is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    if mode == "merged":
        import peftlab

        peftlab.merge(model)
    elif mode == "unloaded":
        import peftlab

        model = peftlab.merge_and_unload(model)
    return model.eval()


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, 16), generator=g).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(args.reps + 1):
            sync()
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            if i:  # the first is warm-up
                prefill.append(time.perf_counter() - t)
        for i in range(args.reps + 1):
            out = model(input_ids=prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            if i:
                decode.append((time.perf_counter() - t) / args.new_tokens)
    return {
        "config": args.config,
        "prefill_s": statistics.median(prefill),
        "decode_s_per_token": statistics.median(decode),
        "peak_rss_gb": harness.peak_rss_gb(),
    }


def report(
    med: dict[str, dict], out=print, raw: dict[str, list[dict]] | None = None
) -> list[tuple[str, float | None, float, str]]:
    """Print the table and the targets (verdict on the ratio of medians; ``paired``: the median
    of same-repeat ratios, with ``raw``); returns (target, value, limit, verdict) rows."""
    base = med.get("base", {})
    out(
        f"\n{'config':<24} {'n':>2} {'prefill s':>10} {'×base':>6} {'decode s/tok':>13} {'×base':>6}"
    )
    for name, m in med.items():
        if "error" in m:
            out(f"{name:<24} {m['n']:>2} error: {m['error'][:150]}")
            continue
        out(
            f"{name:<24} {m['n']:>2} {m['prefill_s']:>10.4f} {fmt(ratio(m, base, 'prefill_s'), '.3f'):>6} "
            f"{m['decode_s_per_token']:>13.5f} {fmt(ratio(m, base, 'decode_s_per_token'), '.3f'):>6}"
        )
    rows = []
    out("\ntarget                                   ratio   limit  verdict  paired")
    for name, limit in [
        ("peftlab-lora-merged", 1.02),
        ("peftlab-dora-merged", 1.02),
        ("peftlab-lora-unloaded", 1.02),
        ("peftlab-lora-unmerged", 1.10),
        ("peft-lora-unmerged", 1.10),
    ]:
        for key, label in (("prefill_s", "prefill"), ("decode_s_per_token", "decode")):
            r = ratio(med.get(name, {}), base, key)
            v = verdict(r, limit)
            rows.append((f"{name} {label} / base", r, limit, v))
            paired = fmt(paired_ratio(raw, name, "base", key))
            out(f"{name + ' ' + label + ' / base':<40} {fmt(r):>6}  ≤{limit:.2f}  {v}     {paired}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.arg_parser(__doc__, CONFIGS, batch=1, dtypes=["fp32", "bf16", "fp16"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config:
        if args.config not in CONFIGS:
            print(f"unknown --config {args.config!r}; choose from {', '.join(CONFIGS)}")
            return 2
        print(harness.RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    keys = ("model", "device", "dtype", "batch", "seq", "new_tokens", "reps", "threads")
    wargs = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return harness.run_driver("inference", args, list(CONFIGS), wargs, report)


if __name__ == "__main__":
    sys.exit(main())
