"""Per-device memory of training on ``N`` devices, data-parallel (DDP) or sharded (FSDP2).

Each device runs its own micro-batch (``batch_size`` is per device, as the trainer's
``batch_size`` is per process), so activations and the loss's workspace are the single-device
figures in both strategies. What differs is where the model's state lives. With ``W`` the
weight bytes, ``G`` the gradient bytes and ``S`` the optimizer-state bytes of one device's
estimate (:func:`peftlab.select.estimator.estimate_memory`):

**DDP** (``torch.nn.parallel.DistributedDataParallel``, what accelerate/torchrun wrap the model
in): every device holds ``W``, ``G`` and ``S`` in full, plus DDP's gradient buckets — flat
all-reduce buffers the size of every trainable gradient, ``G`` bytes, allocated when the model
is wrapped and live from then on (torch's default ``gradient_as_bucket_view=False``, which
accelerate keeps; measured here: wrapping a model with 16 M trainable float32 parameters
added 64 MB + a constant 26 MB, and backward then added its own 64 MB of ``.grad``)::

    per device = single-device estimate + G (buckets, at every moment)

**FSDP** (FSDP2 ``fully_shard`` on every decoder layer, then on the model — the root group: the
embeddings, the final norm, the output head and parameters outside the blocks such as a soft
prompt or a prefix table). Every parameter, trainable or frozen, is split 1/N across devices,
and so are its gradient and its optimizer states; a group's parameters are all-gathered
(unsharded) while it computes::

    weights      = (W − R) / N + R            R: bytes replicated on every device (below)
    gradients    = G / N                      optimizer states = S / N
    in flight    = U_root + 2 · U_layer       forward and backward (incl. recomputation)
    reduce-scatter = (2 + 1/N) · max(G_root, G_layer)   backward's end (and recomputation)

- ``U_layer = (W − R − U_root) / L``: one decoder layer's parameters unsharded. Two are in
  flight at once: the layer computing and the next one, whose all-gather FSDP2 issues ahead
  (forward's implicit prefetch, backward's default prefetch of one).
- ``U_root``: the root group unsharded. FSDP2 leaves the root's parameters unsharded after
  forward (``reshard_after_forward`` is False for the root by default) and reshards them
  after backward, so they are in flight from the start of forward to the end of backward.
- Reduce-scatter: a group's unsharded gradients, the flat buffer they are copied into, and
  the 1/N shard that comes out; the largest group's (``G_root`` or ``G_layer``, trainable
  bytes of one group) bounds it.
- QLoRA: the 4-bit base weights are stored in a dtype FSDP can shard (bitsandbytes'
  ``quant_storage``), so their packed 4 bits per weight shard 1/N; their quantization
  constants (absmax, double-quant scales: ``nf4_bits − 4`` bits per weight) stay on every
  device with each layer's quantization state: ``R = quantized · (nf4_bits − 4) / 8``. 0 for
  every other method.
- Not modelled: dim-0 padding of each shard to a multiple of N (< N rows per parameter), the
  all-gather's flat output buffer while it is copied out, and communication buffers of the
  process group; mixed precision (the estimator's ``dtype`` is the dtype stored, gathered
  and computed in).

``devices=1`` is one device with no wrapper (accelerate wraps the model only when there are
several processes): the single-device figures, exactly. FSDP with one device is refused, as
the trainer refuses an FSDP config with one process.
"""

from __future__ import annotations

import dataclasses

from peftlab.core.config import ConfigError
from peftlab.select.plans import MethodPlan
from peftlab.select.presets import Architecture

STRATEGIES = ("ddp", "fsdp")
SINGLE = "single"
"""The strategy of a one-device estimate (no wrapper)."""
IN_FLIGHT_LAYERS = 2
"""Decoder layers FSDP2 holds unsharded at once: the one computing and the prefetched next."""
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where training runs: ``count`` devices under ``strategy`` ("single", "ddp", "fsdp")."""

    count: int = 1
    strategy: str = SINGLE


def parse_devices(devices: int, strategy: str | None) -> Devices:
    """The run's :class:`Devices`: ``strategy=None`` is DDP on several devices.

    Raises:
        ConfigError: ``devices`` not a positive integer, an unknown strategy, or FSDP on one
            device.
    """
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"devices={devices!r} is invalid: devices must be a positive integer.")
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy={strategy!r} is invalid: strategy must be one of {', '.join(STRATEGIES)}."
        )
    if devices == 1:
        if strategy == "fsdp":
            raise ConfigError(
                "strategy='fsdp' with devices=1 is invalid: FSDP shards across devices; "
                "use devices >= 2, or strategy='ddp' (or none) for the one-device figure."
            )
        return Devices()
    return Devices(devices, strategy or "ddp")


@dataclasses.dataclass(frozen=True)
class Groups:
    """FSDP's groups of one model: bytes unsharded and trainable bytes per group."""

    replicated: float
    """Bytes every device keeps whole (QLoRA's quantization constants)."""
    root: float
    """The root group's parameter bytes (embeddings, final norm, head, prompt/prefix)."""
    layer: float
    """One decoder layer's parameter bytes (sharded part)."""
    root_grads: float
    layer_grads: float
    terms: str = ""
    """The weight bytes as a sum of parameters × bytes ("68.45e9 × 4.127/8 B + …")."""


def fsdp_groups(
    arch: Architecture, p: MethodPlan, weights: float, method_params: int, fp: int, mb: int, tb: int
) -> Groups:
    """Split ``weights`` into FSDP2's groups.

    Args:
        arch, p: the model and what the method does to it.
        weights: all weight bytes of one device's estimate.
        method_params: parameters the method adds.
        fp, mb, tb: bytes per base element outside 4-bit layers, per method parameter, per
            gradient element.
    """
    # FSDP shards parameters, not buffers: VeRA's frozen pair stays whole on every device.
    replicated = p.quantized * (p.quant_bits - 4) / 8 + p.frozen_extra * mb
    outside = bool(p.kv_extra or p.seq_extra)  # a prefix or soft prompt lives at the root
    root = (arch.embedding_params() + arch.head_params()) * fp
    root += (method_params if outside else 0) * mb
    blocks = arch.linear_params() + arch.layers * arch.layer_norm_params()
    if p.trains_base:
        root_trainable = p.trainable - blocks
    else:
        head = arch.classifier_params() if p.head_trainable else 0
        root_trainable = head + (method_params if outside else 0)
    layer_trainable = (p.trainable - root_trainable) / arch.layers
    base = arch.total_params() - p.quantized
    terms = [(p.quantized, f"{p.quant_bits:.4g}/8"), (base, fp), (method_params, mb)]
    terms.append((p.frozen_extra, mb))
    return Groups(
        replicated,
        root,
        (weights - replicated - root) / arch.layers,
        root_trainable * tb,
        layer_trainable * tb,
        " + ".join(f"{n / 1e9:.4g}e9 × {b} B" for n, b in terms if n),
    )


def per_device(a: dict, weights: float, groups: Groups, arch: Architecture, dev: Devices) -> float:
    """Turn the single-device terms ``a`` (the estimator's dict) into one device's, in place,
    and return one device's weight bytes. Adds ``gathered`` (parameters in flight in forward
    and backward), ``reduce_scatter`` (end of backward) and ``buckets`` (every moment)."""
    a["gathered"] = a["reduce_scatter"] = a["buckets"] = 0.0
    if dev.strategy == SINGLE:
        return weights
    if dev.strategy == "ddp":
        a["buckets"] = a["grads"]
        return weights
    n = dev.count
    a["gathered"] = groups.root + min(IN_FLIGHT_LAYERS, arch.layers) * groups.layer
    a["reduce_scatter"] = (2 + 1 / n) * max(groups.root_grads, groups.layer_grads)
    for key in ("grads", "states", "recompute_grads"):
        a[key] /= n
    return (weights - groups.replicated) / n + groups.replicated


def sharding_detail(a: dict, weights: float, groups: Groups, arch, dev: Devices) -> dict:
    """The per-device terms behind an estimate (``MemoryEstimate.detail["devices"]``)."""
    return {
        "devices": dev.count,
        "strategy": dev.strategy,
        "all_weights": weights,
        "weight_terms": groups.terms,
        "replicated_weights": groups.replicated if dev.strategy == "fsdp" else weights,
        "root_group": groups.root,
        "layer_group": groups.layer,
        "in_flight_layers": min(IN_FLIGHT_LAYERS, arch.layers),
        "gathered": a["gathered"],
        "reduce_scatter": a["reduce_scatter"],
        "ddp_buckets": a["buckets"],
    }


def arithmetic(est) -> str:
    """One device's peak as a sum of its terms, in GB ("" for a one-device estimate): "weights
    (38.24 − 1.09) / 4 + 1.09 = 10.38 + in flight 2.10 + 2 × 0.44 = 2.97 + … = 16.53 GB per
    device (FSDP, 4 devices, backward start)"."""
    d = est.detail.get("devices")
    if not d or d["strategy"] == SINGLE:
        return ""
    n, fsdp = d["devices"], d["strategy"] == "fsdp"
    small = 0.001 * est.peak  # terms below this are left out of the sum
    moving = d["gathered"] if est.phase != "gradients complete" else 0.0
    scatter = d["reduce_scatter"] if est.phase != "backward start" else 0.0
    total = f"{d['weight_terms']} = {_gb(d['all_weights'])} GB"
    if not fsdp:
        terms = [f"weights {total}"]
    elif d["replicated_weights"]:
        rep = _gb(d["replicated_weights"])
        terms = [f"weights ({total}, less {rep} replicated) / {n} + {rep} = {_gb(est.weights)}"]
    else:
        terms = [f"weights ({total}) / {n} = {_gb(est.weights)}"]
    if moving:
        k, root, layer = d["in_flight_layers"], _gb(d["root_group"]), _gb(d["layer_group"])
        terms.append(f"in flight {root} + {k} × {layer} = {_gb(moving)}")
    for label, part in (("optimizer", est.optimizer_states), ("gradients", est.gradients)):
        if part >= small:
            terms.append(
                f"{label} {_gb(part * n)} / {n} = {_gb(part)}" if fsdp else f"{label} {_gb(part)}"
            )
    if scatter >= small:
        terms.append(f"reduce-scatter {_gb(scatter)}")
    if d["ddp_buckets"] >= small:
        terms.append(f"DDP buckets {_gb(d['ddp_buckets'])}")
    if est.activations:
        terms.append(f"activations {_gb(est.activations)}")
    rest = est.workspace - moving - scatter - d["ddp_buckets"]
    if rest > small:
        terms.append(f"workspace {_gb(rest)}")
    how = f"{d['strategy'].upper()}, {n} devices, {est.phase}"
    return f"{' + '.join(terms)} = {_gb(est.peak)} GB per device ({how})"


def _gb(x: float) -> str:
    """GB with two decimals, or three significant digits below 1 GB (a small model's terms)."""
    return f"{x / GB:.2f}" if x >= GB else f"{x / GB:.3g}"
