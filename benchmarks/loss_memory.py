"""Training memory and step time of the plain loss, the chunked loss, and the chunked loss
with activation checkpointing, side by side, one process per configuration.

    python -m benchmarks.loss_memory                          # batch 8 × 512, 3 repeats
    python -m benchmarks.loss_memory --batch 2 --steps 2 --repeats 1
    python -m benchmarks.loss_memory --config chunked         # one worker, prints RESULT json

Every configuration trains SmolLM2-135M with peftlab LoRA (r 16, all linear layers) on the
same random batch (labels = inputs: every token carries loss, the chunked loss's least
favourable case), with the trainer's own loss (``peftlab.train.evaluate.loss_sum``) and AdamW
over the LoRA parameters; ``--warmup`` steps, then ``--steps`` timed ones (median).

Time: ``step_s`` is wall-clock, ``cpu_s`` the process's CPU time per step (steadier than the
wall clock on a shared machine, where other processes take turns on the cores).

Memory: ``peak_gb`` is the peak over the steps (warm-up included, so the optimizer state
counts) of the live heap on CPU (glibc ``mallinfo2``, sampled every millisecond, see
``peftlab.bench.measure.PeakMemory``) or ``torch.cuda.max_memory_allocated`` on GPU;
``extra_gb`` is that peak less what was live before the first step (weights, the batch).
``model_gb`` is the peak less what was live before the first step that is not the model's
tensors (the runtime): weights, gradients, optimizer state, activations and workspace — what
``peftlab.estimate_memory`` predicts (``estimated_gb``, peftlab's configurations only).

The peft configurations train peft's LoRA (same rank, alpha and targets) with the model's own
loss (``model(**batch).loss``: the full logits), ``peft+ckpt`` under transformers' gradient
checkpointing (non-reentrant), as a peft user would.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks import harness, loading
from benchmarks.harness import fmt, ratio

CONFIGS = {  # name → (chunked loss, gradient_checkpointing, library)
    "plain": (False, False, "peftlab"),
    "chunked": (True, False, "peftlab"),
    "chunked+ckpt": (True, True, "peftlab"),
    "plain+ckpt": (False, True, "peftlab"),
    "peft": (False, False, "peft"),
    "peft+ckpt": (False, True, "peft"),
}
DEFAULT = "plain,chunked,chunked+ckpt"


def worker(args) -> dict:
    """Build one configuration, train it, and return its measurements."""
    import peftlab
    from peftlab.bench.measure import PeakMemory
    from peftlab.train import checkpointing
    from peftlab.train.evaluate import loss_sum
    from peftlab.train.optim import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    chunked, ckpt, library = CONFIGS[args.config]
    model = loading.load(args)
    estimate = _estimate(model, args, chunked, ckpt) if library == "peftlab" else None
    if library == "peft":
        model = _peft_model(model, ckpt)
    else:
        peftlab.apply(model, peftlab.LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    if ckpt and library == "peftlab":
        checkpointing.enable(model, {"every": args.every, "offload": args.offload})
    model.train()
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", lr=1e-4)

    def step() -> float:
        if library == "peft":  # the peft user's loss: transformers' own, full logits
            return _peft_step(model, batch, opt)
        total, count = loss_sum(model, batch, chunked)
        (total / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total.detach() / count)

    times, cpu, losses = [], [], []
    with PeakMemory(device) as peak:
        for i in range(args.warmup + args.steps):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            losses.append(step())
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    if device.type == "cuda":
        start, top = 0, peak.peak_bytes
    else:
        start, top = peak.start_live_bytes, peak.peak_live_bytes
    # What the estimator predicts: the peak less what was live that is not model tensors.
    other = (start - model_bytes) if start is not None and device.type != "cuda" else 0
    return {
        "estimated_gb": estimate / 1e9 if estimate else None,
        "model_gb": (top - other) / 1e9 if top is not None else None,
        "config": args.config,
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "peak_gb": top / 1e9 if top is not None else None,
        "extra_gb": (top - start) / 1e9 if top is not None and start is not None else None,
        "memory": "cuda max allocated" if device.type == "cuda" else "live heap (mallinfo2)",
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "tokens": args.batch * args.seq,
    }


def _estimate(model, args, chunked: bool, ckpt: bool) -> float | None:
    """``peftlab.estimate_memory``'s training peak for this configuration (bytes)."""
    from peftlab.select.estimator import estimate_memory
    from peftlab.select.presets import from_model

    est = estimate_memory(
        from_model(model),
        {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        batch_size=args.batch,
        seq_len=args.seq,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        gradient_checkpointing={"every": args.every} if ckpt else False,
        device=args.device,
        chunked_loss=chunked,
    )
    return est.peak


def _peft_model(model, ckpt: bool):
    """peft's LoRA (r 16, all linear), with transformers' gradient checkpointing if asked
    (non-reentrant, the setting transformers and peft recommend)."""
    import peft

    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, cfg)


def _peft_step(model, batch: dict, opt) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(med: dict, raw: dict | None = None, out=print) -> list:
    """Print the table and the ratios to the plain loss."""
    out(
        f"\n{'config':<14} {'step s':>8} {'cpu s':>8} {'peak GB':>8} {'extra GB':>9} "
        f"{'loss0':>8} {'model GB':>9} {'est. GB':>8} {'est. err':>9}  n"
    )
    for name, m in med.items():
        err = _error(m)
        out(
            f"{name:<14} {fmt(m.get('step_s'), '.2f'):>8} {fmt(m.get('cpu_s'), '.2f'):>8} "
            f"{fmt(m.get('peak_gb')):>8} "
            f"{fmt(m.get('extra_gb')):>9} {fmt(m.get('first_loss'), '.4f'):>8} "
            f"{fmt(m.get('model_gb')):>9} {fmt(m.get('estimated_gb')):>8} {err:>9}  {m.get('n')}"
            + (f"  {m['error']}" if m.get("error") else "")
        )
    rows = []
    for ref in ("plain", "peft", "peft+ckpt"):
        base = med.get(ref)
        if not base:
            continue
        out(f"\n{'vs ' + ref:<14} {'time':>8} {'cpu':>8} {'peak':>8} {'extra':>9}")
        for name, m in med.items():
            if name == ref:
                continue
            r = [ratio(m, base, k) for k in ("step_s", "cpu_s", "peak_gb", "extra_gb")]
            rows.append((f"{name} / {ref}", *r))
            out(f"{name:<14} {fmt(r[0]):>8} {fmt(r[1]):>8} {fmt(r[2]):>8} {fmt(r[3]):>9}")
    return rows


def _error(m: dict) -> str:
    """The estimator's error against the measured peak of model tensors and training state
    (``model_gb``: the peak less what was live that is not model tensors)."""
    est, got = m.get("estimated_gb"), m.get("model_gb")
    return f"{est / got - 1:+.1%}" if est and got else "-"


def parse_args(argv=None):
    p = harness.arg_parser(__doc__, DEFAULT.split(","), batch=8, dtypes=["fp32", "bf16"])
    p.set_defaults(seq=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--every", type=int, default=1, help="checkpoint every k-th layer")
    p.add_argument("--offload", action="store_true", help="offload checkpointed inputs (GPU)")
    return p.parse_args(argv)


def worker_args(args) -> list[str]:
    keys = ("model", "device", "dtype", "batch", "seq", "warmup", "steps", "threads", "every")
    out = [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]
    return out + (["--offload"] if args.offload else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config:
        if args.config not in CONFIGS:
            print(f"unknown --config {args.config!r}; choose from {', '.join(CONFIGS)}")
            return 2
        print(harness.RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    return harness.run_driver("loss_memory", args, list(CONFIGS), worker_args(args), report)


if __name__ == "__main__":
    sys.exit(main())
