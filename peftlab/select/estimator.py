"""Predict the peak memory of training (and serving) a model with a PEFT method — before a run.

The prediction counts live tensor bytes, the quantity ``torch.cuda.max_memory_allocated``
reports and the one a CPU process's RSS tracks when freed tensors go back to the OS (see
docs/estimator.md for the CPU measurement conditions). Three moments compete for the peak:

    backward start      = weights + optimizer states + activations + loss workspace
    recomputing a block = weights + optimizer states + activations (the loss's freed, one
                          checkpointed block's back) — only with activation checkpointing
    gradients complete  = weights + optimizer states + gradients + workspace (the end of
                          backward and the optimizer step)
    peak                = max of these (the estimate reports the parts of the largest one)

- **weights**: every base parameter in ``dtype`` (4-bit ones at ``nf4_bits`` bits, QLoRA's
  other parameters upcast to float32 as peftlab's QLoRA does), plus the method's parameters
  and frozen tensors (VeRA's shared projections).
- **gradients**: one per trainable parameter, in the parameter's dtype.
- **optimizer states**: bytes per trainable parameter from the optimizer table
  (:data:`peftlab.core.optimizers.OPTIMIZERS`, the one the trainer builds from): AdamW 8 (two
  float32 moments), 8-bit AdamW 2 + one float32 absmax per 256 per moment; the paged ones as
  their unpaged twins on CUDA and as torch AdamW elsewhere (where the trainer falls back to it).
- **activations**: the tensors autograd saves for backward, listed per block from the block's
  operations (:func:`peftlab.select.activations.block_saved_elements`), with per-layer
  activation checkpointing (every layer, every k-th, a list) keeping only the checkpointed
  blocks' inputs, plus what the loss saves: the plain cross-entropy's float32 log-softmax
  (training loops keep only the loss, so the logits are freed before backward), or the
  chunked loss's ``∂L/∂h`` (:mod:`peftlab.select.activations` has the formulas).
- **workspace**: the plain loss backward's two vocabulary-sized buffers (``∂loss/∂log-softmax``
  and ``∂loss/∂logits``) or the chunked loss's ``[chunk, V]`` buffers at the end of the
  forward; the dequantized copy of the largest 4-bit weight; at the end of backward
  two embedding-sized gradient transients when a tied embedding trains (full fine-tuning);
  in the optimizer step of 8-bit AdamW one temporary the size of the largest trainable tensor
  (peftlab's AdamW is torch's fused one, ``peftlab.train.optim``, which updates in place).
- **a classification model's new head** trains under every method unless ``modules_to_save``
  says otherwise (:func:`peftlab.select.plans.trains_head`, the rule ``peftlab.apply`` follows).
- **several devices** (``devices``, ``strategy``): every figure is one device's — DDP adds its
  gradient buckets, FSDP shards parameters, gradients and optimizer states 1/N and adds the
  parameters in flight and the reduce-scatter (:mod:`peftlab.select.devices`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.optimizers import OPTIMIZERS, get_optimizer, optimizer_used
from peftlab.select import devices as multi
from peftlab.select.activations import (
    QKV,
    Checkpointing,
    chunked_loss_applies,
    default_chunk,
    loss_bytes,
    parse_checkpointing,
    saved_activation_bytes,
)
from peftlab.select.models import method_fields, plan
from peftlab.select.plans import MethodPlan
from peftlab.select.presets import BERT, Architecture, resolve_architecture

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZER_BYTES = {name: o.state_bytes for name, o in OPTIMIZERS.items()}
"""Optimizer state bytes per trainable parameter, read from the one optimizer table (on CUDA;
elsewhere the paged ones cost what torch AdamW does)."""
ATTENTION = ("sdpa", "eager")

# The parts of an estimate, in the order reports list them.
PARTS = (
    "weights",
    "gradients",
    "optimizer_states",
    "activations",
    "workspace",
    "peak",
    "inference",
)


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted memory in bytes; ``peak = weights + gradients + optimizer_states + activations
    + workspace`` at the predicted peak moment (``phase``)."""

    model: str
    method: str
    config: dict
    batch_size: int
    seq_len: int
    dtype: str
    optimizer: str
    gradient_checkpointing: bool
    attention: str
    trainable_params: int
    total_params: int
    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    workspace: float
    phase: str
    loaded_weights: float
    """Bytes of the model as loaded in ``dtype`` before the method is applied."""
    inference: float
    """Serving: weights as served (merged when the method merges) + KV cache + one block's transient."""
    detail: dict = dataclasses.field(default_factory=dict)
    chunked_loss: bool = False
    """The loss is the chunked cross-entropy (a causal LM whose head the method leaves alone)."""
    chunk_size: int | None = None
    """Label tokens per chunk of the chunked loss (None: the plain loss)."""
    checkpointed_layers: list[int] = dataclasses.field(default_factory=list)
    """Blocks whose activations are recomputed in backward (0-based)."""
    offload: bool = False
    """Checkpointed inputs wait in CPU memory (saves device memory on "cuda" only)."""
    checkpointing: str = "no checkpointing"
    """The checkpointing in words ("checkpointing every 2nd layer")."""
    devices: int = 1
    """Devices training runs on; every figure is one device's (:mod:`peftlab.select.devices`)."""
    strategy: str = "single"
    """"single" (one device), "ddp" or "fsdp"."""

    @property
    def peak(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.workspace
        )

    @property
    def beyond_load(self) -> float:
        """Peak minus the loaded model: what a CPU run's peak RSS minus RSS after load shows."""
        return self.peak - self.loaded_weights

    def gb(self, what: str = "peak") -> float:
        return getattr(self, what) / GB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(peak=self.peak, beyond_load=self.beyond_load)
        if self.devices > 1:
            d["per_device"] = self.per_device()
        d["gb"] = {k: round(d[k] / GB, 3) for k in PARTS}
        return d

    def setup(self) -> str:
        """The memory savers the estimate assumes, in words ("" for none): "chunked loss
        (512-token chunks), checkpointing every 2nd layer"."""
        parts = [f"chunked loss ({self.chunk_size}-token chunks)"] if self.chunked_loss else []
        return ", ".join(parts + ([self.checkpointing] if self.checkpointed_layers else []))

    def per_device(self) -> str:
        """One device's peak as a sum of its terms ("" on one device)."""
        return multi.arithmetic(self)

    def table(self) -> str:
        rows = list(PARTS)
        setup = self.setup()
        where = (
            f" · {self.devices} devices, {self.strategy}, per device" if self.devices > 1 else ""
        )
        head = (
            f"{self.model} · {self.method} · batch {self.batch_size} × {self.seq_len} · {self.dtype} · "
            f"{self.optimizer}{' · ' + setup if setup else ''} "
            f"· trainable {self.trainable_params:,} of {self.total_params:,}{where}"
        )
        tail = [f"  {self.per_device()}"] if self.devices > 1 else []
        return "\n".join(
            [head]
            + [f"  {r:<17}{getattr(self, r) / GB:9.3f} GB" for r in rows]
            + [f"  (peak at {self.phase})"]
            + tail
        )


def estimate_memory(
    model: str | Architecture,
    method: Any = "lora",
    batch_size: int = 8,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    gradient_checkpointing: Any = False,
    attention: str = "sdpa",
    device: str = "cuda",
    runtime_bytes: float = 0.0,
    *,
    checkpointing: Any = None,
    chunked_loss: bool = True,
    chunk_size: int | None = None,
    devices: int = 1,
    strategy: str | None = None,
) -> MemoryEstimate:
    """Predict training and inference memory of ``method`` on ``model``.

    Args:
        model: a preset name (``peftlab.select.presets.PRESETS``), a bundled model name, a local
            Hugging Face directory, or an :class:`Architecture`.
        method: a method config, a dict with ``method``, or a method name (its defaults).
        batch_size: sequences per optimizer micro-step.
        seq_len: tokens per sequence.
        dtype: the dtype the model is loaded and trained in ("float32", "bfloat16", "float16").
        optimizer: a name in :data:`peftlab.core.optimizers.OPTIMIZERS` ("adamw", "adamw_8bit",
            the paged ones), the names the trainer accepts.
        gradient_checkpointing: the training config's ``gradient_checkpointing``: False, True
            (every layer), ``{"every": k}``, ``{"layers": [...]}`` or a list of layer indices,
            a mapping optionally with ``"offload": True`` (QLoRA's own ``gradient_checkpointing``
            field checkpoints every layer too).
        attention: "sdpa" (transformers' default) or "eager".
        device: "cuda" or "cpu". Matters for 4-bit layers: on the CPU, a layer whose input
            width is not a multiple of the blocksize goes through peftlab's dequantize-and-
            ``F.linear`` fallback, so autograd keeps its dequantized weight (in×out in the
            compute dtype) until backward; bitsandbytes' ``MatMul4Bit`` keeps only the packed
            4-bit weight. Offloading checkpointed inputs saves memory only on "cuda".
        runtime_bytes: memory the framework itself takes on the first training step (thread
            pools, kernel caches; on a GPU the CUDA context), measured once per machine
            (``benchmarks/estimator_compare.py``'s "other MB" bounds it); added to the workspace.
        checkpointing: ``gradient_checkpointing`` by a keyword-only name; give one of the two.
        chunked_loss: a causal LM trains with the trainer's chunked cross-entropy (its
            default); False: the plain loss. Ignored for a classifier and where the method
            replaces the output head (the trainer falls back to the plain loss there).
        chunk_size: label tokens per chunk; None: the trainer's default
            (:func:`peftlab.select.activations.default_chunk`).
        devices: devices training runs on, each with its own ``batch_size`` sequences; the
            estimate is one device's (:mod:`peftlab.select.devices` has the formulas).
        strategy: "ddp" (every device holds the whole model) or "fsdp" (FSDP2: parameters,
            gradients and optimizer states sharded 1/``devices``); None: DDP. Ignored on one
            device except that "fsdp" is refused there.

    Raises:
        ConfigError: an unknown model, method, dtype, optimizer, attention, checkpointing or
            strategy value, a non-positive size or device count, or FSDP on one device.
    """
    _check_args(dtype, optimizer, device, attention, batch_size, seq_len, chunk_size)
    dev = multi.parse_devices(devices, strategy)
    arch = resolve_architecture(model)
    p = plan(arch, method)
    ckpt = _checkpointing(gradient_checkpointing, checkpointing, p, arch)
    chunk = None
    if chunked_loss and chunked_loss_applies(arch, p):
        chunk = chunk_size or default_chunk(arch.vocab)
    run = _Run(batch_size, seq_len, dtype, optimizer, attention, device, runtime_bytes, dev)
    return _estimate(arch, method_fields(method), p, run, ckpt, chunk)


@dataclasses.dataclass(frozen=True)
class _Run:
    """The run an estimate is for (the arguments of :func:`estimate_memory`)."""

    batch_size: int
    seq_len: int
    dtype: str
    optimizer: str
    attention: str
    device: str
    runtime_bytes: float
    devices: multi.Devices = multi.Devices()


def _estimate(arch, method: tuple[str, dict], p: MethodPlan, run: _Run, ckpt, chunk):
    """The terms of the estimate, and the parts of its peak moment."""
    (name, fields), b = method, DTYPE_BYTES[run.dtype]
    weights, method_params, fp = _weight_bytes(arch, p, b)
    train_bytes = 4 if p.upcast_non_quantized else b
    opt = optimizer_used(run.optimizer, cuda=run.device == "cuda")
    a = {"grads": p.trainable * train_bytes, "states": p.trainable * opt.state_bytes}
    tokens = (run.batch_size, run.seq_len)
    saved, a["recompute"], a["recompute_grads"] = saved_activation_bytes(
        arch, p, *tokens, run.attention, fp, ckpt, run.device == "cuda", train_bytes
    )
    loss_saved, a["loss_ws"] = loss_bytes(arch, p, *tokens, fp, fp, chunk)
    a["dequant"], quant_saved = _dequantized_bytes(arch, p, fields, run.device, ckpt)
    a["acts"] = saved + loss_saved + quant_saved
    a["recompute"] += quant_saved
    a["step_ws"] = _step_workspace(arch, p, opt, train_bytes)
    a["runtime"] = run.runtime_bytes
    mb = 4 if p.upcast_non_quantized else b
    groups = multi.fsdp_groups(arch, p, weights, method_params, fp, mb, train_bytes)
    device_weights = multi.per_device(a, weights, groups, arch, run.devices)
    est = MemoryEstimate(
        model=arch.name,
        method=name,
        config={"method": name, **fields},
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        dtype=run.dtype,
        optimizer=run.optimizer,
        gradient_checkpointing=bool(ckpt.layers),
        attention=run.attention,
        trainable_params=p.trainable,
        total_params=arch.total_params() + method_params,
        weights=device_weights,
        optimizer_states=a["states"],
        loaded_weights=_loaded_bytes(arch, b, run.devices),
        inference=_inference_bytes(arch, p, *tokens, b, weights, method_params),
        chunked_loss=chunk is not None,
        chunk_size=chunk,
        checkpointed_layers=list(ckpt.layers),
        offload=ckpt.offload,
        checkpointing=ckpt.describe(arch.layers),
        devices=run.devices.count,
        strategy=run.devices.strategy,
        **_peak_moment(a),
    )
    est.detail = _detail(est, a, p, run.device, fp)
    est.detail["devices"] = multi.sharding_detail(a, weights, groups, arch, run.devices)
    return est


def _loaded_bytes(arch: Architecture, b: int, dev: multi.Devices) -> float:
    """The model as loaded in ``dtype``, on one device (FSDP: its shard)."""
    loaded = arch.total_params() * b
    return loaded / dev.count if dev.strategy == "fsdp" else loaded


def _check_args(dtype, optimizer, device, attention, batch_size, seq_len, chunk_size) -> None:
    """Raise :class:`ConfigError` naming the first invalid argument."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"dtype={dtype!r} is invalid: dtype must be one of {', '.join(DTYPE_BYTES)}."
        )
    get_optimizer(optimizer)  # an unknown name is a ConfigError that lists the known ones
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r} is invalid: device must be 'cuda' or 'cpu'.")
    if attention not in ATTENTION:
        raise ConfigError(
            f"attention={attention!r} is invalid: attention must be 'sdpa' or 'eager'."
        )
    for key, v in (("batch_size", batch_size), ("seq_len", seq_len), ("chunk_size", chunk_size)):
        if key == "chunk_size" and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key}={v!r} is invalid: {key} must be a positive integer.")


def _checkpointing(gradient_checkpointing, checkpointing_, p: MethodPlan, arch) -> Checkpointing:
    """The blocks checkpointed: the run's setting (either keyword), and every block when the
    method turns transformers' checkpointing on itself (QLoRA's ``gradient_checkpointing``)."""
    spec = gradient_checkpointing
    if checkpointing_ is not None:
        if gradient_checkpointing not in (False, None) and gradient_checkpointing != checkpointing_:
            raise ConfigError(
                f"checkpointing={checkpointing_!r} and gradient_checkpointing="
                f"{gradient_checkpointing!r} disagree: give one of the two"
            )
        spec = checkpointing_
    ckpt = parse_checkpointing(spec, arch.layers)
    if p.checkpointing:
        return Checkpointing(tuple(range(arch.layers)), ckpt.offload)
    return ckpt


def _weight_bytes(arch: Architecture, p: MethodPlan, b: int) -> tuple[float, int, int]:
    """``(weight bytes, parameters the method adds, bytes per non-4-bit base element)``.

    A trained classification head is the base model's own, not the method's; QLoRA upcasts
    every 16-bit parameter outside its 4-bit layers (its own included) to float32."""
    fp = 4 if (p.upcast_non_quantized and b < 4) else b
    head = arch.classifier_params() if p.head_trainable else 0
    method_params = 0 if p.trains_base else p.trainable - head
    weights = (arch.total_params() - p.quantized) * fp + p.quantized * p.quant_bits / 8
    weights += method_params * (4 if p.upcast_non_quantized else b) + p.frozen_extra * b
    return weights, method_params, fp


def _dequantized_bytes(arch, p: MethodPlan, fields: dict, device: str, ckpt: Checkpointing):
    """``(workspace, saved)`` bytes of 4-bit layers: the dequantized copy of the largest one
    (in ``compute_dtype``), and on the CPU the dequantized weights autograd keeps.

    peftlab's CPU fallback for widths bitsandbytes' kernel cannot block evenly
    (``in_features % blocksize != 0``) dequantizes and calls ``F.linear``: autograd keeps the
    dequantized weight. bitsandbytes' own ``MatMul4Bit`` keeps only the packed weight."""
    if not p.quantized:
        return 0.0, 0.0
    shapes = arch.linear_shapes()
    compute = DTYPE_BYTES.get(str(fields.get("compute_dtype", "float32")).replace("torch.", ""), 4)
    dequant = max(i * o for i, o, _ in shapes.values()) * compute
    if device != "cpu":
        return dequant, 0.0
    bs = int(fields.get("blocksize", 64))
    dense = [s for s in p.targets if shapes[s][0] % bs]
    per_block = sum(shapes[s][0] * shapes[s][1] for s in dense)
    qkv = sum(shapes[s][0] * shapes[s][1] for s in dense if s in QKV)
    # Every block not checkpointed keeps its own, the checkpointed ones one at a time (the
    # block being recomputed); block 0's q/k/v inputs need no gradient unless it is
    # checkpointed (nothing before them trains).
    plain = arch.layers - len(ckpt.layers)
    kept = plain * per_block + (per_block if ckpt.layers else 0) - (0 if 0 in ckpt.layers else qkv)
    return dequant, kept * compute


def _step_workspace(arch: Architecture, p: MethodPlan, opt, train_bytes: int) -> float:
    """Transients at the end of backward and in the optimizer step."""
    largest = _largest_trainable(arch, p)
    step_ws = largest * train_bytes if opt.step_temporary else 0.0  # fused AdamW: none
    if p.embeddings_trainable and arch.tied_embeddings:
        # A tied input/output embedding gets two gradients in one backward (the LM head's,
        # then the embedding's dense one), summed into a third: two embedding-sized
        # transients on top of every other gradient at the end of backward.
        step_ws += 2 * arch.vocab * arch.hidden * train_bytes
    return step_ws


def _peak_moment(a: dict) -> dict:
    """The parts of the largest moment: backward start (every saved activation, the loss's
    and the 4-bit workspaces), recomputing a checkpointed block (the loss's tensors freed, one
    block's saved tensors back), or gradients complete (every gradient, the step's
    transients). On several devices each moment adds what its strategy holds then
    (:func:`peftlab.select.devices.per_device`; 0 on one device): DDP's buckets throughout,
    FSDP's gathered parameters in forward and backward and its reduce-scatter in backward."""
    comm = a["runtime"] + a["buckets"]
    a["bwd"] = a["acts"] + a["loss_ws"] + a["dequant"] + comm + a["gathered"]
    a["recompute_moment"] = a["recompute"] + a["recompute_grads"] + a["dequant"] + comm
    a["recompute_moment"] += a["gathered"] + a["reduce_scatter"]
    a["step"] = a["grads"] + a["step_ws"] + comm + a["reduce_scatter"]
    if a["bwd"] >= a["recompute_moment"] and a["bwd"] >= a["step"]:
        workspace = a["loss_ws"] + a["dequant"] + comm + a["gathered"]
        return dict(
            gradients=0.0, activations=a["acts"], workspace=workspace, phase="backward start"
        )
    if a["recompute_moment"] >= a["step"]:
        return dict(
            gradients=a["recompute_grads"],
            activations=a["recompute"],
            workspace=a["dequant"] + comm + a["gathered"] + a["reduce_scatter"],
            phase="recomputing a checkpointed block",
        )
    workspace = a["step_ws"] + comm + a["reduce_scatter"]
    return dict(
        gradients=a["grads"], activations=0.0, workspace=workspace, phase="gradients complete"
    )


def _detail(est: MemoryEstimate, a: dict, p: MethodPlan, device: str, fp: int) -> dict:
    """The terms behind the parts (``MemoryEstimate.detail``)."""
    return {
        "saved_activations": a["acts"],
        "loss_workspace": a["loss_ws"],
        "dequant_workspace": a["dequant"],
        "all_gradients": a["grads"],
        "runtime_bytes": a["runtime"],
        "step_workspace": a["step_ws"],
        "quantized_params": p.quantized,
        "quant_bits": p.quant_bits,
        "device": device,
        "activation_bytes_per_element": fp,
        "recompute_activations": a["recompute"],
        "backward_start_bytes": est.weights + est.optimizer_states + a["bwd"],
        "recompute_bytes": est.weights + est.optimizer_states + a["recompute_moment"],
        "optimizer_step_bytes": est.weights + est.optimizer_states + a["step"],
    }


def _largest_trainable(arch: Architecture, p: MethodPlan) -> int:
    if p.trains_base:
        return max(
            arch.vocab * arch.hidden, max(i * o for i, o, _ in arch.linear_shapes().values())
        )
    if p.prefix_mlp_hidden:
        return p.prefix_mlp_hidden * arch.layers * 2 * arch.kv_dim
    if p.kv_extra:
        return p.kv_extra * arch.layers * 2 * arch.kv_dim
    shapes = arch.linear_shapes()
    lr = [r * max(shapes[s][0], shapes[s][1]) for s, r in p.targets.items()]
    lr += [shapes[s][0 if side == "in" else 1] for s, side in p.scaled.items()]  # IA³ vectors
    lr += list(p.projected.values())  # VeRA's d
    return max(lr + [arch.hidden * p.bottleneck, arch.hidden * p.seq_extra, 1])


def _inference_bytes(arch, p, batch, seq, b, train_weights, method_params) -> float:
    """Weights as served + KV cache for the prompt (+ virtual tokens) + one block's transient."""
    if p.mergeable and not p.quantized:
        weights = arch.total_params() * b  # the update is folded in: the base model's size
    else:
        weights = (
            train_weights
            - method_params * (4 if p.upcast_non_quantized else b)
            + p.inference_extra_params * b
        )
    tokens = seq + p.kv_extra + p.seq_extra
    kv = 0 if arch.family == BERT else 2 * arch.layers * arch.kv_dim * tokens * batch * b
    transient = batch * (seq + p.seq_extra) * 2 * arch.intermediate * b + batch * arch.vocab * b
    return weights + kv + transient
