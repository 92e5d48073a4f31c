"""Sharded data-parallel training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``distributed: {strategy: fsdp}`` in the training config, launched on N processes
(``torchrun --nproc_per_node=N -m peftlab.cli train cfg.yaml`` or ``accelerate launch``),
shards the model instead of replicating it. peftlab drives FSDP2 itself through
``torch.distributed`` (accelerate still sets up the process group and the device; the model is
not passed to ``accelerator.prepare``).

**What is sharded.** Every decoder layer (the classes a transformers model lists in
``_no_split_modules``) becomes one FSDP unit, and the root module one more unit holding what
is left (embeddings, final norm, output head, a virtual-token method's parameters). Each
parameter of a unit — frozen base weights exactly like trainable adapter weights — is split
along its first dimension into N shards, one per process (a ``DTensor``). A unit's full
parameters exist only while it runs: they are all-gathered before its forward and before its
backward and freed after, and its gradients are reduce-scattered (averaged over processes,
as DDP's all-reduce averages) so every process keeps the gradient of its own shard. The
optimizer holds only the trainable parameters' shards and steps them locally. Per process,
with P parameter bytes, G gradient bytes and O optimizer-state bytes of the whole model,

    memory ≈ (P + G + O) / N + (the largest unit's full parameters, while it runs)

against P + G + O for each DDP process. Everything else (data order, the token-normalized
loss, clipping by the global gradient norm, the learning-rate schedule) is the trainer's
unchanged: the loss scale ``N / (response tokens of the step)`` and the averaging
reduce-scatter give the gradient of one big batch, the same as one process with the global
batch, up to float rounding.

**Mixed precision.** With ``mixed_precision: bf16`` each unit's parameters are gathered in
bfloat16 for compute and gradients are reduced in float32 (``MixedPrecisionPolicy``); the
sharded parameters and the optimizer state stay float32. (One process or DDP runs bf16 as
autocast instead, so bf16 curves differ slightly across strategies; fp32 curves agree.)

**Evaluation and saving.** Evaluation runs with every unit gathered (:func:`gathered`): each
process holds the full parameters while it scores its share of the examples, so processes
that generate answers of different lengths never wait on each other. The final adapter is
gathered to full float32 tensors on every process and written by the main one
(:func:`save_adapter`): the same files, names and format as a single-process run.

**Checkpoints** (:func:`save_sharded` / :func:`load_sharded`): the trainable parameters' and
the optimizer's shards go to ``sharded/`` in the checkpoint directory through
``torch.distributed.checkpoint`` (one file per process and a metadata file); a resume must
run on the same number of processes (:func:`check_world`).

**Not supported** (refused in one line): one process (nothing to shard), ``qlora`` (4-bit base
weights are not stored in a dtype FSDP shards), ``mixed_precision: fp16`` (its loss scaler
does not handle sharded gradients; use bf16), the bitsandbytes optimizers (only ``adamw``),
and accelerate's own FSDP plugin (``accelerate launch --use_fsdp``; the config key selects
FSDP). Gradient accumulation reduce-scatters after every micro-batch (correct, not the
fewest messages). FSDP refills a unit's gathered parameters in place without counting a
write; peftlab counts one before each unit's forward (:func:`_count_gather`), so the caches
keyed on ``version_key`` (DoRA's row norms, grouped LoRA's stacked factors) stay right.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from peftlab.core.config import ConfigError, check

STRATEGIES = ("ddp", "fsdp")
KEYS = ("strategy",)
UNSHARDABLE = {"qlora": "its 4-bit base weights are not stored in a dtype FSDP shards"}
"""Methods refused under FSDP, with the reason."""


def check_spec(spec: dict, method: str, mixed_precision: str, optimizer: str) -> dict:
    """The ``distributed`` key checked and completed (``strategy`` defaults to ddp).

    Raises:
        ConfigError: an unknown key, an unknown strategy, or FSDP with what it cannot shard.
    """
    unknown = sorted(set(spec) - set(KEYS), key=str)
    check(not unknown, "distributed", spec, f"a mapping with the key(s) {', '.join(KEYS)}")
    spec = {"strategy": "ddp", **spec}
    strategy = spec["strategy"]
    allowed = "one of " + ", ".join(repr(s) for s in STRATEGIES)
    check(strategy in STRATEGIES, "distributed.strategy", strategy, allowed)
    if strategy == "fsdp":
        why = UNSHARDABLE.get(method)
        check(why is None, "distributed.strategy", strategy, f"'ddp' with method {method!r}: {why}")
        check(
            mixed_precision != "fp16",
            "distributed.strategy",
            strategy,
            "'ddp' with mixed_precision 'fp16' (its loss scaler does not handle sharded "
            "gradients); with fsdp use mixed_precision 'bf16' or 'no'",
        )
        check(
            optimizer == "adamw",
            "distributed.strategy",
            strategy,
            f"'ddp' with optimizer {optimizer!r}; with fsdp use optimizer 'adamw'",
        )
    return spec


def enabled(cfg) -> bool:
    return cfg.distributed["strategy"] == "fsdp"


def check_launch(cfg, accelerator) -> None:
    """Refuse an FSDP run on one process and accelerate's own FSDP plugin (one line each)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "accelerate launch --use_fsdp: peftlab drives FSDP itself; launch without the "
            "accelerate FSDP plugin and set distributed: {strategy: fsdp} in the config"
        )
    if enabled(cfg) and accelerator.num_processes < 2:
        raise ConfigError(
            "distributed.strategy='fsdp' is invalid on 1 process: FSDP shards across processes; "
            "launch with torchrun --nproc_per_node=N (N >= 2) -m peftlab.cli train CONFIG, or "
            "use strategy 'ddp'"
        )


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units below the root: the decoder (or encoder) layers, the
    classes the model lists in ``_no_split_modules``; else the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module, cfg) -> nn.Module:
    """Apply ``fully_shard`` to every unit, then to the root (in place; returns ``model``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in reversed(units(model)):  # inner before outer, should units nest
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for m in _fsdp_modules(model):  # after FSDP's own pre-forward hook, which gathers
        m.register_forward_pre_hook(_count_gather)
    return model


def _count_gather(module: nn.Module, args) -> None:
    """FSDP has just gathered this unit's parameters into the storage they had before, without
    counting a write (``Tensor._version``): count one, so that the caches keyed on
    ``version_key`` (DoRA's row norms, grouped LoRA's stacked factors) see the new values.
    Not while :func:`gathered` holds every unit (nothing changes between those forwards)."""
    if not getattr(module, "_peftlab_gathered", False):
        _count_writes(module)


def _count_writes(module: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    plain = [p for p in module.parameters() if not isinstance(p, DTensor)]  # the gathered
    if plain:
        torch.autograd.graph.increment_version(plain)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every unit's full parameters on every process (for evaluation): forwards inside run
    without collectives. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    # The root never reshards after forward (FSDP2 sets that up at its first forward); the
    # units are told not to for the time being, and are told again afterwards.
    mods = _fsdp_modules(model)
    inner = [m for m in mods if m is not model]
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
        m._peftlab_gathered = True
    _count_writes(model)
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m._peftlab_gathered = False
        for m in inner:
            m.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def full_trainable(model: nn.Module):
    """The trainable parameters swapped for their full float32 tensors (all-gathered on every
    process) and put back afterwards: what the adapter is saved from. No forward may run
    inside. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    swapped, full = [], {}  # full: one gathered tensor per parameter, so tied ones stay tied
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                mod._parameters[name] = full[id(p)]
                swapped.append((mod, name, p))
    try:
        yield model
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def save_adapter(accelerator, model: nn.Module, dest: Path) -> None:
    """Write the adapter as a single-process run would (every process must call this: under
    FSDP the shards are gathered first; the main process writes)."""
    from peftlab.train import rundir

    with full_trainable(model):
        if accelerator.is_main_process:
            rundir.save_adapter(model, dest)
    accelerator.wait_for_everyone()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``t`` (``t`` itself when it is not a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def any_process(flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over the processes (each process passes its own)."""
    import torch.distributed as dist

    if not flags or not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(model: nn.Module, optimizer, path: Path) -> None:
    """Write the trainable parameters' and optimizer's shards to ``path`` (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    params = {n: p.detach() for n, p in _trainable(model).items()}
    dcp.save(
        {"model": params, "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path
    )


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Read the shards at ``path`` into copies, check every process's are finite, then copy
    them into ``model`` and ``optimizer`` (every process).

    Raises:
        ValueError: the files are unreadable or hold non-finite weights (on every process).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    params = _trainable(model)
    state = {
        "model": {n: torch.empty_like(p.detach()) for n, p in params.items()},
        "optim": get_optimizer_state_dict(model, optimizer),  # initializes the state to fill
    }
    try:
        dcp.load(state, checkpoint_id=path)
    # Any failure to read means "do not trust it"; dcp raises CheckpointException (a
    # BaseException) on every process when one of them failed.
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(f"{type(e).__name__}: {first}"[:200]) from None
    names = list(state["model"])
    bad = any_process([not bool(torch.isfinite(local(state["model"][n])).all()) for n in names])
    if any(bad):
        raise ValueError(f"non-finite weights in {[n for n, b in zip(names, bad) if b][:3]}")
    with torch.no_grad():
        for n, t in state["model"].items():
            local(params[n]).copy_(local(t))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def check_world(saved_world: int, world: int, path: Path) -> None:
    """A sharded checkpoint resumes only on the number of processes that wrote it."""
    if saved_world != world:
        raise ConfigError(
            f"checkpoint {path} holds FSDP shards of {saved_world} processes; resume it on "
            f"{saved_world} (torchrun --nproc_per_node={saved_world}), not {world}"
        )
