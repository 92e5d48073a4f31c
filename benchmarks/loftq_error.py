"""LoftQ vs plain QLoRA: the 4-bit quantization error each starts from, per layer and for the
model's logits, on SmolLM2-135M (issue #22).

    python -m benchmarks.loftq_error                       # ranks 8, 16, 64; writes the figure
    python -m benchmarks.loftq_error --model tiny --ranks 4 --figure /tmp/loftq.png

Per linear layer (every one but the output head): W the float weight, Q = dequant(NF4(W))
(bitsandbytes, double quantization, blocks of 64: what ``peftlab.apply(QLoRAConfig)`` does),
plain error ‖W − Q‖_F/‖W‖_F; LoftQ's at rank r is ‖W − (Q + s·B·A)‖_F/‖W‖_F, measured on the
layers ``peftlab.apply(QLoRAConfig(r=r, init="loftq"))`` builds. Model: the relative error
‖logits − logits_float‖/‖logits_float‖ on a fixed batch of text (plain QLoRA vs LoftQ at each
rank). Deterministic: no timing, one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from types import SimpleNamespace

import torch

from benchmarks import loading

TEXT = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Parameter-efficient fine-tuning trains a small number of weights on top of a frozen model.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Water boils at 100 degrees Celsius at sea level, and at lower temperatures on mountains.",
]


def _batch(args, model) -> dict:
    if args.model == loading.TINY:
        return {
            "input_ids": torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
        }
    from peftlab.models import load_tokenizer

    tok = load_tokenizer(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(TEXT, return_tensors="pt", padding=True))


def _logit_error(model, batch, want) -> float:
    with torch.no_grad():
        got = model(**batch).logits.float()
    mask = batch.get("attention_mask", torch.ones(got.shape[:2]))[..., None].bool()
    return float((got - want).masked_fill(~mask, 0).norm() / want.masked_fill(~mask, 0).norm())


def measure(args) -> dict:
    import peftlab
    from peftlab.core.weights import dense_weight
    from peftlab.methods._loftq import quantization_error

    torch.manual_seed(0)
    spec = SimpleNamespace(model=args.model, dtype="fp32", device="cpu")
    ref = loading.load(spec).eval()
    batch = _batch(args, ref)
    with torch.no_grad():
        want = ref(**batch).logits.float()
    weights = {
        n: dense_weight(m).detach().clone()
        for n, m in ref.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    del ref
    out = {"layers": list(weights), "plain": None, "ranks": {}, "logits": {}}
    plain = peftlab.apply(loading.load(spec).eval(), peftlab.QLoRAConfig(r=args.ranks[0]))
    out["plain"] = [quantization_error(plain.get_submodule(n), w, None) for n, w in weights.items()]
    out["logits"]["plain QLoRA"] = _logit_error(plain, batch, want)
    del plain
    for r in args.ranks:
        cfg = peftlab.QLoRAConfig(r=r, alpha=2 * r, init="loftq")
        model = peftlab.apply(loading.load(spec).eval(), cfg)
        out["ranks"][r] = [
            quantization_error(model.get_submodule(n), w, "default") for n, w in weights.items()
        ]
        out["logits"][f"LoftQ r={r}"] = _logit_error(model, batch, want)
        del model
    return out


def report(res: dict, print_=print) -> None:
    plain = res["plain"]
    print_(f"{len(plain)} linear layers; relative weight error ‖W − approx‖/‖W‖")
    print_(f"{'start':<14} {'mean':>8} {'median':>8} {'max':>8} {'vs plain':>9}   logits error")
    rows = [("plain QLoRA", plain)] + [(f"LoftQ r={r}", e) for r, e in res["ranks"].items()]
    for label, errs in rows:
        ratio = statistics.mean(e / p for e, p in zip(errs, plain))
        print_(
            f"{label:<14} {statistics.mean(errs):>8.4f} {statistics.median(errs):>8.4f} "
            f"{max(errs):>8.4f} {ratio:>8.3f}×   {res['logits'][label]:.4f}"
        )


def figure(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(res["plain"]))
    ax.plot(x, res["plain"], label="plain NF4 (QLoRA, B = 0)", lw=1.2, color="black")
    for r, errs in res["ranks"].items():
        ax.plot(x, errs, label=f"LoftQ init, r = {r}", lw=1)
    ax.set_xlabel("linear layer (model order: q, k, v, o, gate, up, down per block)")
    ax.set_ylabel("‖W − (Q + s·B·A)‖ / ‖W‖")
    ax.set_title("Where QLoRA starts: 4-bit error per layer, SmolLM2-135M")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", default="docs/results/loftq-error.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(args)
    report(res)
    if args.figure:
        figure(res, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
