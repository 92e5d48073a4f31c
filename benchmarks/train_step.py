"""Training-step time and peak memory: peftlab vs peft, side by side, one process per config.

    python -m benchmarks.train_step                      # driver: all configs, 3 repeats
    python -m benchmarks.train_step --configs floor,peftlab-lora-all,peft-lora-all --repeats 5
    python -m benchmarks.train_step --config peftlab-dora-all   # one worker, prints RESULT json

Every configuration runs the same model (SmolLM2-135M by default) on the same batch
(random token ids, batch 4 × 128, labels = inputs), AdamW over its trainable parameters
(peftlab's trainer optimizer, fused torch AdamW, for peftlab and peft configs alike),
``--warmup`` untimed steps then ``--steps`` timed ones; the worker reports the median step.
The "floor" is the frozen base model's forward plus the backward to its input embeddings
(no parameter gradients, no optimizer): the least any adapter method can cost.

``*-group`` configurations are the same adapters with grouped A products on (off by default;
q/k/v and gate/up sharing one x·[A_q; A_k; A_v]ᵀ, see ``peftlab.methods._lora_group``),
``*-nogroup`` with them off whatever the default, to measure the grouping side by side:

    python -m benchmarks.train_step --configs floor,peftlab-lora-all-group,peftlab-lora-all-nogroup

Memory: ``peak_rss_gb`` is the whole process's peak resident set (model load included);
``train_peak_rss_gb`` is the peak while training alone (the kernel's counter is reset after
setup); on CUDA ``cuda_peak_gb`` is ``torch.cuda.max_memory_allocated`` over training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import harness, loading
from benchmarks.harness import fmt, paired_ratio, ratio, verdict
from peftlab.train.optim import make_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- configurations ------------------------------------------------------------------------
def _peftlab(method: str, quantized: bool = False, group: bool | None = None, **fields) -> Callable:
    def build(args) -> nn.Module:
        import peftlab

        if method not in peftlab.methods():
            raise RuntimeError(f"peftlab has no method {method!r} yet (has {peftlab.methods()})")
        model = loading.load(args, quantized=quantized)
        extra = {"compute_dtype": QLORA_DTYPES[args.dtype]} if method == "qlora" else {}
        peftlab.apply(model, peftlab.config_from_dict({"method": method, **fields, **extra}))
        if group:  # grouped A products (off by default until this benchmark shows a gain)
            from peftlab.methods.lora import grouping

            grouping(True)
        elif group is False:
            _ungroup(model)
        return model

    return build


def _ungroup(model: nn.Module) -> None:
    """Grouped A products off on this model alone (no family of sibling names matches)."""
    from peftlab.methods import _lora_group
    from peftlab.methods.lora import LoRALinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    _lora_group.link(layers, families=())


def _peft(make_config: Callable, quantized: bool = False) -> Callable:
    def build(args) -> nn.Module:
        import peft

        model = loading.load(args, quantized=quantized)
        if quantized:  # the QLoRA recipe's preparation, without gradient checkpointing (as ours)
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft.get_peft_model(model, make_config(peft))

    return build


def _peft_lora(targets, **kw) -> Callable:
    return lambda peft: peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM", **kw
    )


DEFAULT_IS = {f"peftlab-{m}-all": f"peftlab-{m}-all-nogroup" for m in ("lora", "dora", "qlora")}
"""A default configuration → the same configuration named explicitly (grouping is off by
default), so either name answers the targets."""
QLORA_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QV = ["q_proj", "v_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
CONFIGS: dict[str, Callable] = {
    "floor": lambda args: loading.load(args),
    "peftlab-lora-qv": _peftlab("lora", target_modules=QV, **LORA),
    "peft-lora-qv": _peft(_peft_lora(QV)),
    "peftlab-lora-all": _peftlab("lora", target_modules="all-linear", **LORA),
    "peft-lora-all": _peft(_peft_lora("all-linear")),
    "peftlab-dora-all": _peftlab("dora", target_modules="all-linear", **LORA),
    # the same adapters, each layer computing its own A product (grouping off)
    "peftlab-lora-all-nogroup": _peftlab("lora", group=False, target_modules="all-linear", **LORA),
    "peftlab-lora-all-group": _peftlab("lora", group=True, target_modules="all-linear", **LORA),
    "peftlab-dora-all-group": _peftlab("dora", group=True, target_modules="all-linear", **LORA),
    "peftlab-dora-all-nogroup": _peftlab("dora", group=False, target_modules="all-linear", **LORA),
    "peft-dora-all": _peft(_peft_lora("all-linear", use_dora=True)),
    # LoHa at r=8: 2r·(in + out) per layer, the parameters of the LoRA configs above (r=16).
    "peftlab-loha-all": _peftlab("loha", target_modules="all-linear", r=8, alpha=8),
    "peft-loha-all": _peft(lambda peft: peft.LoHaConfig(r=8, alpha=8, target_modules="all-linear")),
    "peftlab-lokr-all": _peftlab("lokr", target_modules="all-linear", r=8, alpha=8),
    "peft-lokr-all": _peft(lambda peft: peft.LoKrConfig(r=8, alpha=8, target_modules="all-linear")),
    # VeRA at peft's default rank (256): out + r trained numbers per layer.
    "peftlab-vera-all": _peftlab("vera", target_modules="all-linear", r=256),
    "peft-vera-all": _peft(lambda peft: peft.VeraConfig(r=256, target_modules="all-linear")),
    # QLoRA: both sides adapt the very same bitsandbytes NF4 (double-quantized) base.
    "peftlab-qlora-all": _peftlab("qlora", quantized=True, target_modules="all-linear", **LORA),
    "peftlab-qlora-all-nogroup": _peftlab(
        "qlora", quantized=True, group=False, target_modules="all-linear", **LORA
    ),
    "peft-qlora-all": _peft(_peft_lora("all-linear"), quantized=True),
    # Prefix tuning, 20 virtual tokens: a plain prefix table (peft's default), and with the
    # reparameterization MLP (peftlab's default; peft's prefix_projection) of width 512.
    "peftlab-prefix": _peftlab("prefix", num_virtual_tokens=20, reparam=False),
    "peft-prefix": _peft(
        lambda peft: peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    ),
    "peftlab-prefix-mlp": _peftlab("prefix", num_virtual_tokens=20, reparam_hidden=512),
    "peft-prefix-mlp": _peft(
        lambda peft: peft.PrefixTuningConfig(
            num_virtual_tokens=20,
            prefix_projection=True,
            encoder_hidden_size=512,
            task_type="CAUSAL_LM",
        )
    ),
    "peftlab-adapter": _peftlab("adapter"),
    "full": _peftlab("full"),
}


# -- worker --------------------------------------------------------------------------------
def make_batch(args, vocab_size: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (args.batch, args.seq), generator=g).to(device)


def worker(args) -> dict:
    """Build one configuration, train it, and return its measurements."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = CONFIGS[args.config](args)
    if not getattr(model, "hf_device_map", None):  # a bitsandbytes model is placed already
        model.to(device)
    model.train()
    load_s = time.perf_counter() - t0
    ids = make_batch(args, model.config.vocab_size, device)
    floor = args.config == "floor"
    params = [p for p in model.parameters() if p.requires_grad]
    if floor:
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
    opt = make_optimizer(params, "adamw", lr=1e-4) if params else None  # same for every config
    embed = model.get_input_embeddings()

    def step() -> float:
        if floor:
            # Backward to the input embeddings only: no weight gradient, no optimizer state.
            inputs = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    setup_rss = harness.rss_gb()
    harness.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t = time.perf_counter()
        losses.append(step())
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in params)
    memory = {  # read before any profiling, whose own buffers would count
        "setup_rss_gb": setup_rss,
        "train_peak_rss_gb": harness.peak_rss_gb(),
        "peak_rss_gb": _process_peak_gb(),
    }
    if device.type == "cuda":
        memory["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    ops = profile_steps(step, args.profile_steps, device) if args.profile_steps else {}
    result = {
        "config": args.config,
        "step_s": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "load_s": load_s,
        **memory,
        "trainable_params": trainable,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        **loading.quantized_storage(model),
        **ops,
    }
    return result


def profile_steps(step: Callable[[], float], n: int, device: torch.device) -> dict:
    """Run ``n`` more steps under torch's profiler; per step (median): ``op_s``, the summed
    self time of every operator (autograd nodes, custom Functions and the optimizer
    included), and ``mm_s``, that of matrix products. The work a step does, without the
    time spent between operators; on CPU it is far steadier across processes than the wall
    clock (it still moves with the machine's speed)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    op_s, mm_s = [], []
    for _ in range(n):
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        events = prof.key_averages()
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        op_s.append(sum(getattr(e, attr) for e in events) / 1e6)
        mm_s.append(
            sum(
                getattr(e, attr)
                for e in events
                if e.key in ("aten::mm", "aten::addmm", "aten::bmm")
            )
            / 1e6
        )
    return {"op_s": statistics.median(op_s), "mm_s": statistics.median(mm_s)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _process_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


# -- report --------------------------------------------------------------------------------
def report(
    med: dict[str, dict], out=print, raw: dict[str, list[dict]] | None = None
) -> list[tuple[str, float | None, float, str]]:
    """Print the table and the issue's targets; returns (target, value, limit, verdict) rows.

    The verdict is on the ratio of medians; with ``raw`` (every repeat's results) the median
    of same-repeat ratios is printed beside it (``paired``)."""
    cuda = any("cuda_peak_gb" in m for m in med.values())
    mem = "cuda_peak_gb" if cuda else "peak_rss_gb"
    ops = any("op_s" in m for m in med.values())
    out(
        f"\n{'config':<26} {'n':>2} {'step s':>8} {'×floor':>7} {'peak RSS GB':>11} "
        f"{'train RSS GB':>12}"
        + (f" {'CUDA GB':>8}" if cuda else "")
        + f" {'trainable':>11}"
        + (f" {'op s':>7} {'×floor':>7}" if ops else "")
    )
    floor = med.get("floor", {})
    for name, m in med.items():
        if "error" in m:
            out(f"{name:<26} {m['n']:>2} error: {m['error'][:150]}")
            continue
        out(
            f"{name:<26} {m['n']:>2} {m['step_s']:>8.3f} {fmt(ratio(m, floor, 'step_s')):>7} "
            f"{m['peak_rss_gb']:>11.3f} {fmt(m.get('train_peak_rss_gb')):>12}"
            + (f" {fmt(m.get('cuda_peak_gb')):>8}" if cuda else "")
            + f" {m['trainable_params']:>11,}"
            + (f" {fmt(m.get('op_s')):>7} {fmt(ratio(m, floor, 'op_s')):>7}" if ops else "")
        )

    def resolve(name):  # the default configurations are the ungrouped ones (grouping is off)
        alias = DEFAULT_IS.get(name)
        return alias if name not in med and alias in med else name

    def get(name):
        return med.get(resolve(name), {})

    rows: list[tuple[str, float | None, float, str]] = []
    checks = [
        ("LoRA all-linear step / floor", "peftlab-lora-all", "floor", "step_s", 1.10),
        ("LoRA all-linear memory / peft", "peftlab-lora-all", "peft-lora-all", mem, 0.90),
        ("LoRA q,v step / peft (info)", "peftlab-lora-qv", "peft-lora-qv", "step_s", 1.00),
        ("LoRA all-linear step / peft (info)", "peftlab-lora-all", "peft-lora-all", "step_s", 1.00),
        ("DoRA step / peft DoRA", "peftlab-dora-all", "peft-dora-all", "step_s", 0.85),
        ("DoRA step / own LoRA", "peftlab-dora-all", "peftlab-lora-all", "step_s", 1.25),
        ("DoRA memory / peft DoRA", "peftlab-dora-all", "peft-dora-all", mem, 0.90),
        ("prefix step / peft", "peftlab-prefix", "peft-prefix", "step_s", 1.00),
        ("prefix memory / peft", "peftlab-prefix", "peft-prefix", mem, 1.00),
        ("prefix+MLP step / peft", "peftlab-prefix-mlp", "peft-prefix-mlp", "step_s", 1.00),
        ("prefix+MLP memory / peft", "peftlab-prefix-mlp", "peft-prefix-mlp", mem, 1.00),
        ("full step / floor (info)", "full", "floor", "step_s", 99.0),
        ("QLoRA step / peft QLoRA (info)", "peftlab-qlora-all", "peft-qlora-all", "step_s", 1.00),
        ("QLoRA memory / peft QLoRA (info)", "peftlab-qlora-all", "peft-qlora-all", mem, 1.00),
        ("LoHa step / peft LoHa (info)", "peftlab-loha-all", "peft-loha-all", "step_s", 1.00),
        ("LoKr step / peft LoKr (info)", "peftlab-lokr-all", "peft-lokr-all", "step_s", 1.00),
        ("VeRA step / peft VeRA (info)", "peftlab-vera-all", "peft-vera-all", "step_s", 1.00),
        ("LoHa memory / peft LoHa (info)", "peftlab-loha-all", "peft-loha-all", mem, 1.00),
        ("LoKr memory / peft LoKr (info)", "peftlab-lokr-all", "peft-lokr-all", mem, 1.00),
        ("VeRA memory / peft VeRA (info)", "peftlab-vera-all", "peft-vera-all", mem, 1.00),
        (
            "LoRA grouped / ungrouped (info)",
            "peftlab-lora-all-group",
            "peftlab-lora-all-nogroup",
            "step_s",
            1.00,
        ),
        (
            "DoRA grouped / ungrouped (info)",
            "peftlab-dora-all-group",
            "peftlab-dora-all-nogroup",
            "step_s",
            1.00,
        ),
        (
            "QLoRA grouped / ungrouped (info)",
            "peftlab-qlora-all-group",
            "peftlab-qlora-all-nogroup",
            "step_s",
            1.00,
        ),
        (
            "LoRA grouped / ungrouped mem (info)",
            "peftlab-lora-all-group",
            "peftlab-lora-all-nogroup",
            mem,
            1.00,
        ),
    ]
    out(
        "\ntarget                               ratio   limit  verdict  paired"
        + ("  op time" if ops else "")
    )
    for label, a, b, key, limit in checks:
        a, b = resolve(a), resolve(b)
        r = ratio(get(a), get(b), key)
        v = verdict(r, limit)
        rows.append((label, r, limit, v))
        op = f"  {fmt(ratio(get(a), get(b), 'op_s')):>7}" if ops and key == "step_s" else ""
        out(
            f"{label:<36} {fmt(r):>6}  ≤{limit:.2f}  {v}     "
            f"{fmt(paired_ratio(raw, a, b, key))}{op}"
        )
    for name in ("peftlab-qlora-all", "peft-qlora-all"):
        bits = get(name).get("quant_bits_per_param")
        if bits is not None:
            out(
                f"{name}: base weights {bits:.3f} bits/param ({bits / 8:.4f} bytes) vs the "
                f"4.127-bit NF4+double-quant floor ({bits / 4.127:.3f}×)"
            )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.arg_parser(__doc__, CONFIGS, batch=4, dtypes=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the timed steps, this many under torch's profiler: adds op_s (summed "
        "operator time per step) and mm_s; the verdicts stay on the wall clock",
    )
    return p.parse_args(argv)


def worker_args(args) -> list[str]:
    keys = (
        "model",
        "device",
        "dtype",
        "batch",
        "seq",
        "warmup",
        "steps",
        "threads",
        "profile_steps",
    )
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config:
        if args.config not in CONFIGS:
            print(f"unknown --config {args.config!r}; choose from {', '.join(CONFIGS)}")
            return 2
        print(harness.RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    return harness.run_driver("train_step", args, list(CONFIGS), worker_args(args), report)


if __name__ == "__main__":
    sys.exit(main())
