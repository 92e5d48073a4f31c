"""Predicted vs measured training memory, every method on the bundled SmolLM2, two batch sizes.

Each (method, batch size, allocator setting) runs in its own subprocess:

1. load SmolLM2-135M (float32) and copy every parameter into ordinary memory (the loader
   memory-maps the safetensors file, so untouched weights are not yet resident and a 4-bit
   method could not give the float pages back) — then record RSS ("after load");
2. ``peftlab.apply`` the method; AdamW; ``--steps`` training steps on random tokens
   (batch × ``--seq`` tokens, labels = inputs) while a thread samples RSS every millisecond;
3. measured = peak RSS − RSS after load; predicted = ``estimate_memory(...).beyond_load``
   (the estimator's peak minus the loaded float32 weights: the same quantity).

Allocator: with glibc's default dynamic mmap threshold, freed tensors up to 32 MB stay in the
heap and RSS overstates live memory; ``MALLOC_MMAP_THRESHOLD_=65536`` gives each tensor
above 64 KiB its own mapping, returned on free, so RSS tracks live tensor bytes. Both are
measured; the first is the one the estimator predicts.

    python benchmarks/memory_study.py                    # writes docs/results/estimator_study.{md,json}
    python benchmarks/memory_study.py --methods lora --batches 2 --allocators mmap
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "full": {},
    "lora": {"r": 8, "target_modules": "all-linear"},
    "dora": {"r": 8, "target_modules": "all-linear"},
    "qlora": {"r": 8, "target_modules": "all-linear"},
    "adapter": {},
    "prefix": {"num_virtual_tokens": 20},
    "ptuning-v2": {"num_virtual_tokens": 20},
    "prompt": {"num_virtual_tokens": 20},
}
RUNTIME = "runtime"
"""Worker name of the runtime measurement (tiny model, same harness and allocator)."""
ALLOCATORS = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def worker(method: str, batch: int, seq: int, steps: int, attention: str = "sdpa") -> dict:
    import threading

    import psutil
    import torch

    import peftlab
    import peftlab.quant  # noqa: F401  (bitsandbytes: see below)
    from peftlab.models import load_model

    # peftlab.quant imports bitsandbytes now: its ~45 MB of library memory would otherwise land
    # in QLoRA's "training" peak, since apply imports it lazily.

    torch.set_num_threads(2)
    torch.manual_seed(0)
    proc = psutil.Process()
    if method == RUNTIME:  # a tiny Llama: its tensors are < 1 MB, so the growth is the runtime's
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_implementation=attention,
            )
        )
    else:
        model = load_model("smollm2-135m", attn_implementation=attention)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # out of the file mapping, into anonymous memory
    import gc

    gc.collect()
    rss_load = proc.memory_info().rss
    config = peftlab.config_from_dict(
        {"method": "lora" if method == RUNTIME else method, **METHODS.get(method, {})}
    )
    peftlab.apply(model, config)
    model.train()
    trainable, total = peftlab.trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    peak, stop = [rss_load], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    stop.set()
    thread.join()
    return {
        "method": method,
        "attention": attention,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "config": config.to_dict(),
        "trainable_params": trainable,
        "rss_after_load": rss_load,
        "peak_rss": peak[0],
        "measured_bytes": peak[0] - rss_load,
        "train_seconds": time.perf_counter() - t0,
    }


def predict(
    method: str, batch: int, seq: int, attention: str = "sdpa", runtime: float = 0.0
) -> dict:
    import peftlab
    from peftlab.select.estimator import estimate_memory

    cfg = peftlab.config_from_dict({"method": method, **METHODS[method]})
    est = estimate_memory(
        "smollm2-135m",
        cfg,
        batch_size=batch,
        seq_len=seq,
        dtype="float32",
        optimizer="adamw",
        attention=attention,
        device="cpu",
        runtime_bytes=runtime,
    )
    return {"predicted_bytes": est.beyond_load, "estimate": est.to_dict()}


def machine() -> dict:
    import psutil
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "glibc": " ".join(platform.libc_ver()),
        "threads": 2,
    }


def render(rows: list[dict], info: dict) -> str:
    lines = [
        "# Memory estimator vs measurement (SmolLM2-135M, CPU)",
        "",
        f"Machine: {info['machine']}. Command: `{info['command']}`.",
        "",
        "Measured = peak RSS − RSS after loading the model (float32 weights resident); predicted =",
        "`estimate_memory(..., dtype='float32', device='cpu').beyond_load`. AdamW, "
        f"{info['steps']} steps, sequence {info['seq']}, random tokens.",
        "",
        "Predicted includes the runtime's own growth, measured on a tiny model in the same harness",
        "(`runtime MB`).",
        "",
        "| method | batch | attention | allocator | trainable | runtime MB | predicted MB | measured MB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = (r["predicted_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
        lines.append(
            f"| {r['method']} | {r['batch']} | {r.get('attention', 'sdpa')} | {r['allocator']} | {r['trainable_params']:,} | {r.get('runtime_bytes', 0) / 1e6:,.0f} | "
            f"{r['predicted_bytes'] / 1e6:,.0f} | {r['measured_bytes'] / 1e6:,.0f} | {err:+.1%} |"
        )
    mm = [r for r in rows if r["allocator"] == "mmap"]
    if mm:
        worst = max(abs(r["predicted_bytes"] / r["measured_bytes"] - 1) for r in mm)
        lines += ["", f"Largest error with `MALLOC_MMAP_THRESHOLD_=65536`: {worst:.1%}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "estimator_study"))
    ap.add_argument(
        "--repredict", action="store_true", help="recompute OUT.json's predictions only"
    )
    ap.add_argument(
        "--append", action="store_true", help="keep the other rows of an existing OUT.json"
    )
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(args.worker[0], int(args.worker[1]), args.seq, args.steps, args.attention)
            )
        )
        return 0
    rows = []
    done = Path(args.out + ".json")
    if args.repredict:  # the estimator changed: new predictions for the measured rows
        old = json.loads(done.read_text())
        rows = old["rows"]
        runtime = {
            a: run_worker(RUNTIME, 2, a, args)["measured_bytes"]
            for a in {r["allocator"] for r in rows}
        }
        for r in rows:
            r["runtime_bytes"] = runtime[r["allocator"]]
            r.update(
                predict(
                    r["method"],
                    r["batch"],
                    r["seq"],
                    r.get("attention", "sdpa"),
                    r["runtime_bytes"],
                )
            )
        write(args, rows, {**old["info"], "predictions_by": "python " + " ".join(sys.argv)})
        return 0
    if args.append and done.exists():
        keys = {
            (m, b, a, args.attention)
            for m in args.methods
            for b in args.batches
            for a in args.allocators
        }
        rows = [
            r
            for r in json.loads(done.read_text())["rows"]
            if (r["method"], r["batch"], r["allocator"], r.get("attention", "sdpa")) not in keys
        ]
    for alloc in args.allocators:
        # The framework's own growth on a first training step (thread pools, kernel caches),
        # measured on a tiny model in the same harness; the estimator adds it as workspace.
        runtime = run_worker(RUNTIME, 2, alloc, args)["measured_bytes"]
        for method in args.methods:
            for batch in args.batches:
                row = {
                    **run_worker(method, batch, alloc, args),
                    "allocator": alloc,
                    "runtime_bytes": runtime,
                }
                row.update(predict(method, batch, args.seq, args.attention, runtime))
                rows.append(row)
                err = row["predicted_bytes"] / row["measured_bytes"] - 1
                print(
                    f"{alloc:8s} {method:10s} b{batch}: predicted {row['predicted_bytes'] / 1e6:7.0f} MB "
                    f"measured {row['measured_bytes'] / 1e6:7.0f} MB ({err:+.1%})",
                    flush=True,
                )
                write(args, rows)  # after every run: a study stopped early keeps its rows
    return 0


def run_worker(method: str, batch: int, alloc: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh subprocess under allocator setting ``alloc``."""
    env = {**os.environ, **ALLOCATORS[alloc], "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        str(batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--attention",
        args.attention,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{method} batch {batch} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(args: argparse.Namespace, rows: list[dict], info: dict | None = None) -> None:
    info = info or {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "seq": args.seq,
        "steps": args.steps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(render(rows, info))


if __name__ == "__main__":
    sys.exit(main())
