"""What a training step must cost, counted rather than timed: saved activations and FLOPs.

    python -m benchmarks.graph_cost                       # SmolLM2-135M, batch 4 × 128
    python -m benchmarks.graph_cost --model tiny --configs floor,peftlab-lora-all

Timings on a shared machine are noisy; these two counts are exact and explain them:

- ``saved_gb``: bytes of the tensors autograd keeps for the backward pass (each storage once;
  model weights excluded: they exist anyway). This is the activation memory of a step.
- ``gflop``: floating-point operations of forward + backward (``torch.utils.flop_counter``;
  matrix products and attention, which are nearly all of the work).

The configurations are those of :mod:`benchmarks.train_step`, built the same way.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import train_step

DEFAULT = "floor,peftlab-lora-all,peft-lora-all,peftlab-dora-all,peft-dora-all"


def saved_bytes(model, step) -> int:
    """Bytes autograd saves during ``step()``'s forward, each storage once, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in weights and t.device.type != "meta":
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def measure(args, config: str) -> dict:
    args.config = config
    torch.manual_seed(0)
    model = train_step.CONFIGS[config](args).train()
    ids = train_step.make_batch(args, model.config.vocab_size, args.device)
    if config == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step():
        if config == "floor":
            inputs = embed(ids).detach().requires_grad_(True)
            return model(inputs_embeds=inputs, labels=ids).loss
        return model(input_ids=ids, labels=ids).loss

    saved = saved_bytes(model, step)
    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return {"saved_gb": saved / 1e9, "gflop": counter.get_total_flops() / 1e9}


def decode_flops(args, config: str, tokens: int = 4) -> float:
    """FLOPs per greedily decoded token (KV cache, after a 16-token prompt) for an
    :mod:`benchmarks.inference` configuration."""
    from benchmarks import inference

    args.config = config
    model = inference.build(args)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        counter = FlopCounterMode(display=False)
        with counter:
            for _ in range(tokens):
                token = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return counter.get_total_flops() / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", help="instead: FLOPs per decoded token of these inference configs")
    args = p.parse_args(argv)
    args.device, args.dtype = "cpu", "fp32"
    torch.set_num_threads(args.threads)
    if args.decode:
        base = None
        for c in args.decode.split(","):
            f = decode_flops(args, c)
            base = f if base is None else base
            print(f"{c:<24} {f / 1e6:9.1f} MFLOP/token  {f / base:6.3f}× first", flush=True)
        return 0
    print(f"{'config':<20} {'saved GB':>9} {'GFLOP':>8} {'FLOP ×floor':>12}", flush=True)
    floor = None
    for c in args.configs.split(","):
        r = measure(args, c)
        floor = r if c == "floor" else floor
        x = f"{r['gflop'] / floor['gflop']:.3f}" if floor else "—"
        print(f"{c:<20} {r['saved_gb']:>9.3f} {r['gflop']:>8.1f} {x:>12}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
