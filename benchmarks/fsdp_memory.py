"""Per-process memory of full fine-tuning under FSDP2 against one process: parameters,
gradients and AdamW states, counted tensor by tensor.

    python -m benchmarks.fsdp_memory                      # 1 process, then 2 under torchrun
    python -m benchmarks.fsdp_memory --hidden 64 --layers 2 --steps 1   # a smoke run
    torchrun --nproc_per_node=2 -m benchmarks.fsdp_memory --worker      # one side only

The model is a randomly initialised Llama (``--hidden``, ``--layers``, vocabulary 32000 unless
``--vocab``) with peftlab's ``full`` method (every parameter trains), AdamW, on random token
batches. One process trains it whole; the FSDP side shards it the way the trainer does
(:func:`peftlab.train.fsdp.shard`: each decoder layer a unit, the root one more).

What is counted, per process, after every optimizer step (the largest value is reported):
the bytes of the parameters this process stores (its shards under FSDP), of their gradients,
and of the optimizer's state tensors (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``). With N
processes these should be about 1/N of one process's (a shard is ⌈rows / N⌉ rows of each
tensor, so small tensors round up). Not counted: activations, and the full parameters of the
one unit FSDP gathers while it runs (reported apart as ``largest_unit_bytes``), nor the
allocator's own overhead: this is the arithmetic of the states, not a heap measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

RESULT = "RESULT "


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftlab
    from peftlab.core.config import config_from_dict

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
    )
    model = LlamaForCausalLM(cfg)
    peftlab.apply(model, config_from_dict({"method": "full"}))
    return model


def _nbytes(t) -> int:
    from peftlab.train.fsdp import local

    if not isinstance(t, torch.Tensor):
        return 0
    t = local(t)
    return t.numel() * t.element_size()


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this process stores of parameters, gradients and optimizer states."""
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values()]
    out = {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_nbytes(v) for v in states),
    }
    out["total"] = sum(out.values())
    return out


def worker(args) -> dict:
    """Train ``args.steps`` steps here (sharded when launched on 2+ processes)."""
    import torch.distributed as dist

    from peftlab.train import fsdp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model = _model(args)
    unit_bytes = max(sum(_nbytes(p) for p in u.parameters()) for u in fsdp.units(model))
    if world > 1:
        fsdp.shard(model, argparse.Namespace(mixed_precision="no"))
    # Gradients stay allocated between steps (set_to_none=False), as they do at the peak.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    peak: dict[str, int] = {}
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        now = state_bytes(model, opt)
        peak = now if not peak or now["total"] > peak["total"] else peak
        opt.zero_grad(set_to_none=False)
    result = {"world": world, **peak, "largest_unit_bytes": unit_bytes}
    if world > 1:
        dist.destroy_process_group()
    return result


def _run(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    return [json.loads(ln[len(RESULT) :]) for ln in lines]


def report(one: dict, sharded: list[dict], out=print) -> None:
    mib = 2**20
    out(f"{'':24}{'params':>10}{'grads':>10}{'optimizer':>11}{'total':>10}  MiB")
    out(
        f"{'1 process':24}{one['params'] / mib:10.2f}{one['grads'] / mib:10.2f}"
        f"{one['optimizer'] / mib:11.2f}{one['total'] / mib:10.2f}"
    )
    for r in sorted(sharded, key=lambda r: r["rank"]):
        name = f"FSDP rank {r['rank']} of {r['world']}"
        out(
            f"{name:24}{r['params'] / mib:10.2f}"
            f"{r['grads'] / mib:10.2f}{r['optimizer'] / mib:11.2f}{r['total'] / mib:10.2f}"
            f"  ({r['total'] / one['total']:.3f} of one process)"
        )
    out(f"largest unit gathered while it runs: {one['largest_unit_bytes'] / mib:.2f} MiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", action="store_true", help="measure here and print RESULT json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        r = worker(args)
        print(RESULT + json.dumps({**r, "rank": int(os.environ.get("RANK", "0"))}), flush=True)
        return 0
    if shutil.which("torchrun") is None:
        raise SystemExit("torchrun is not on PATH")
    flags = list(argv if argv is not None else sys.argv[1:])
    me = [sys.executable, "-m", "benchmarks.fsdp_memory", "--worker", *flags]
    (one,) = _run(me)
    sharded = _run(["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", *me[1:]])
    report(one, sharded)
    print(RESULT + json.dumps({"one": one, "fsdp": sharded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
