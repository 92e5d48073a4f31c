"""Predict the peak memory of training (and serving) a model with a PEFT method — before a run.

The prediction counts live tensor bytes, the quantity ``torch.cuda.max_memory_allocated``
reports and the one a CPU process's RSS tracks when freed tensors go back to the OS (see
docs/estimator.md for the CPU measurement conditions). Two moments compete for the peak:

    backward start      = weights + optimizer states + activations + loss workspace
    gradients complete  = weights + optimizer states + gradients + workspace (the end of
                          backward and the optimizer step)
    peak                = max of the two (the estimate reports the parts of the larger one)

- **weights**: every base parameter in ``dtype`` (4-bit ones at ``nf4_bits`` bits, QLoRA's
  other parameters upcast to float32 as peftlab's QLoRA does), plus the method's parameters.
- **gradients**: one per trainable parameter, in the parameter's dtype.
- **optimizer states**: bytes per trainable parameter from the optimizer table
  (:data:`peftlab.core.optimizers.OPTIMIZERS`, the one the trainer builds from): AdamW 8 (two
  float32 moments), 8-bit AdamW 2 + one float32 absmax per 256 per moment; the paged ones as
  their unpaged twins on CUDA and as torch AdamW elsewhere (where the trainer falls back to it).
- **activations**: the tensors autograd saves for backward, listed per block from the block's
  operations (:func:`block_saved_elements`), plus the float32 log-softmax the cross-entropy
  saves (training loops keep only the loss, so the logits are freed before backward). With
  gradient checkpointing: each block's input plus one block recomputed at a time.
- **workspace**: the loss backward's two vocabulary-sized buffers (``∂loss/∂log-softmax`` and
  ``∂loss/∂logits``), the dequantized copy of the largest 4-bit weight; at the end of backward
  two embedding-sized gradient transients when a tied embedding trains (full fine-tuning);
  in the optimizer step of 8-bit AdamW one temporary the size of the largest trainable tensor
  (peftlab's AdamW is torch's fused one, ``peftlab.train.optim``, which updates in place).
- **a classification model's new head** trains under every method unless ``modules_to_save``
  says otherwise (:func:`peftlab.select.plans.trains_head`, the rule ``peftlab.apply`` follows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.optimizers import OPTIMIZERS, get_optimizer, optimizer_used
from peftlab.select.models import method_fields, plan
from peftlab.select.plans import MethodPlan
from peftlab.select.presets import BERT, Architecture, resolve_architecture

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZER_BYTES = {name: o.state_bytes for name, o in OPTIMIZERS.items()}
"""Optimizer state bytes per trainable parameter, read from the one optimizer table (on CUDA;
elsewhere the paged ones cost what torch AdamW does)."""
ATTENTION = ("sdpa", "eager")
QKV = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
}
O_PROJ = {"self_attn.o_proj", "attention.output.dense"}
UP = {"mlp.gate_proj", "mlp.up_proj", "intermediate.dense"}
DOWN = {"mlp.down_proj", "output.dense"}

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
        d["gb"] = {k: round(d[k] / GB, 3) for k in PARTS}
        return d

    def table(self) -> str:
        rows = list(PARTS)
        head = (
            f"{self.model} · {self.method} · batch {self.batch_size} × {self.seq_len} · {self.dtype} · "
            f"{self.optimizer}{' · checkpointing' if self.gradient_checkpointing else ''} "
            f"· trainable {self.trainable_params:,} of {self.total_params:,}"
        )
        return "\n".join(
            [head]
            + [f"  {r:<17}{getattr(self, r) / GB:9.3f} GB" for r in rows]
            + [f"  (peak at {self.phase})"]
        )


def _lowrank_extra(p: MethodPlan, arch: Architecture, suffixes: set[str]) -> int:
    """Per token: each low-rank target saves A's output (r); DoRA also keeps
    z = W0·x + s·B·A·x (out) for the magnitude's gradient (plus two ``(out,)`` vectors, counted
    per block in :func:`_activation_bytes`)."""
    shapes = arch.linear_shapes()
    n = 0
    for s in suffixes & set(p.targets):
        n += p.targets[s]
        if p.dora:
            n += shapes[s][1]
    return n


def _adapter_extra(p: MethodPlan, arch: Architecture, suffixes: set[str]) -> int:
    """Per token: an adapter saves its input (for the down-projection's weight gradient) and
    its activation's saved tensors (width m)."""
    return sum(
        arch.hidden + p.adapter_act_saves * p.bottleneck for s in p.adapters if s in suffixes
    )


def block_saved_elements(
    arch: Architecture,
    p: MethodPlan,
    seq: int,
    attention: str,
    grad_in: bool,
    training: bool = True,
) -> float:
    """Elements per token that autograd keeps for one block's backward.

    Derived from the block's operations (HF Llama/BERT code, PyTorch's autograd formulas): an
    op saves an input only when the gradient it computes needs it, so a frozen linear layer
    saves nothing (∂x = ∂y·W needs only W), a low-rank target saves its input and A's output,
    an RMSNorm saves its input and 1/rms, SiLU its input, a product both factors.
    Attention ("sdpa", the flash kernel used on CPU and GPU) saves q, k, v, the output and
    one log-sum-exp per head; "eager" saves q, k and v repeated to every head and the
    softmax probabilities (heads × key length); BERT with dropout in training runs the math
    path: q, k, v, probabilities, dropout mask and dropped probabilities.
    ``grad_in``: the block's input needs a gradient (false for block 0 unless the embeddings
    or a soft prompt train).
    """
    h, i = arch.hidden, arch.intermediate
    tk = seq + p.kv_extra
    f = tk / seq
    lin = set(p.targets)
    attn_grad = grad_in or bool(lin & QKV) or p.kv_extra > 0
    drop = arch.dropout > 0 and training
    n = 0.0
    if arch.family == BERT:
        if lin & QKV:
            n += h  # block input, read by the targeted q/k/v
        if attn_grad:
            if attention == "sdpa" and not drop:
                n += 2 * h + 2 * h * f + arch.heads
            else:
                n += h + 2 * h * f + arch.heads * tk * (3 if drop else 1)
                n += h if lin & O_PROJ else 0
        elif lin & O_PROJ:
            n += h
        n += _lowrank_extra(p, arch, QKV | O_PROJ) + _adapter_extra(p, arch, O_PROJ)
        n += (h if drop else 0) + h + 2  # dropout mask, LayerNorm input, mean and 1/std
        n += h if lin & UP else 0
        n += i + (i if lin & DOWN else 0)  # GELU input; its output for a trained down-projection
        n += _lowrank_extra(p, arch, UP | DOWN) + _adapter_extra(p, arch, DOWN)
        n += (h if drop else 0) + h + 2
        return n
    if grad_in:
        n += h + 1  # RMSNorm input and 1/rms
    if p.norms_trainable:
        n += h  # normalized input, for the norm weight's gradient
    n += h if lin & QKV else 0
    if attn_grad:
        if attention == "sdpa" and not p.kv_extra:
            n += 2 * arch.q_dim + 2 * arch.kv_dim * f + arch.heads
        elif attention == "sdpa":
            # With a prefix, transformers passes a mask: k and v are repeated to every head and
            # the float mask (key length per token) is saved too.
            n += 2 * arch.q_dim + 2 * arch.q_dim * f + arch.heads + tk
        else:
            # q·kᵀ saves k only when q needs a gradient (not in block 0 without grad_in).
            k = arch.q_dim * f if (grad_in or lin & QKV) else 0
            n += (
                arch.q_dim
                + k
                + arch.q_dim * f
                + arch.heads * tk
                + (arch.q_dim if lin & O_PROJ else 0)
            )
    elif lin & O_PROJ:
        n += arch.q_dim
    n += _lowrank_extra(p, arch, QKV | O_PROJ) + _adapter_extra(p, arch, O_PROJ)
    n += h + 1 + (h if p.norms_trainable else 0)
    n += h if lin & UP else 0
    n += 3 * i + (i if lin & DOWN else 0)  # gate (SiLU input), up, SiLU output; their product
    n += _lowrank_extra(p, arch, UP | DOWN) + _adapter_extra(p, arch, DOWN)
    return n


def _activation_bytes(arch, p, batch, seq, attention, act_bytes, checkpointing, training=True):
    """(saved activation bytes, loss-backward workspace bytes)."""
    s = seq + p.seq_extra
    tokens = batch * s
    grad0 = p.embeddings_trainable or p.seq_extra > 0 or checkpointing
    blocks = [
        block_saved_elements(arch, p, s, attention, grad_in=(k > 0 or grad0), training=training)
        for k in range(arch.layers)
    ]
    if checkpointing:
        # Each block keeps only its input; in backward one block at a time is recomputed.
        per_token = arch.layers * arch.hidden + max(blocks)
    else:
        per_token = sum(blocks)
    h = arch.hidden
    if arch.family == BERT:
        emb = (h + 2 + (h if arch.dropout else 0)) if grad0 else 0
        head = (
            4 * h * batch
        )  # pooler input/tanh output, dropout mask, classifier input ([CLS] only)
        saved = (per_token + emb) * tokens * act_bytes + head * act_bytes
        return saved, 0.0
    final = h + 1 + (h if p.norms_trainable else 0) + (h if p.head_trainable else 0)
    saved = (per_token + final) * tokens * act_bytes
    if p.prefix_mlp_hidden:  # the reparameterization MLP, run once per block
        saved += arch.layers * p.kv_extra * 2 * p.prefix_mlp_hidden * act_bytes
    # The loss runs in float32 (transformers' loss and peftlab.train upcast the logits).
    # Training loops keep only the loss, so by backward the logits are gone; cross-entropy saved
    # its log-softmax, and its backward makes two more vocabulary-sized tensors
    # (∂/∂log-softmax, ∂/∂logits). The prompt's positions are cut before the head.
    logits = batch * seq * arch.vocab * 4
    return saved + logits, 2 * logits


def estimate_memory(
    model: str | Architecture,
    method: Any = "lora",
    batch_size: int = 8,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
    runtime_bytes: float = 0.0,
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
        gradient_checkpointing: recompute activations in backward (QLoRA's own
            ``gradient_checkpointing`` field turns it on too).
        attention: "sdpa" (transformers' default) or "eager".
        device: "cuda" or "cpu". Matters for 4-bit layers: on the CPU, a layer whose input
            width is not a multiple of the blocksize goes through peftlab's dequantize-and-
            ``F.linear`` fallback, so autograd keeps its dequantized weight (in×out in the
            compute dtype) until backward; bitsandbytes' ``MatMul4Bit`` keeps only the packed
            4-bit weight.

        runtime_bytes: memory the framework itself takes on the first training step (thread
            pools, kernel caches; on a GPU the CUDA context), measured once per machine
            (the "other MB" column of ``benchmarks/estimator_compare.py`` bounds it from
            above: it also holds the tokenizer and data); added to the workspace.

    Raises:
        ConfigError: an unknown model, method, dtype, optimizer or attention, or a non-positive size.
    """
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
    for key, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v!r} is invalid: {key} must be a positive integer.")
    arch = resolve_architecture(model)
    name, fields = method_fields(method)
    p = plan(arch, method)
    ckpt = gradient_checkpointing or p.checkpointing
    b = DTYPE_BYTES[dtype]
    total = arch.total_params()
    fp = 4 if (p.upcast_non_quantized and b < 4) else b
    act_bytes = fp
    # Parameters the method adds (a trained classification head is the base model's own).
    head = arch.classifier_params() if p.head_trainable else 0
    method_params = 0 if p.trains_base else p.trainable - head
    weights = (total - p.quantized) * fp + p.quantized * p.quant_bits / 8
    weights += method_params * (4 if p.upcast_non_quantized else b)
    train_bytes = 4 if p.upcast_non_quantized else b
    grads = p.trainable * train_bytes
    opt = optimizer_used(optimizer, cuda=device == "cuda")
    states = p.trainable * opt.state_bytes
    acts, loss_ws = _activation_bytes(arch, p, batch_size, seq_len, attention, act_bytes, ckpt)
    shapes = arch.linear_shapes()
    if p.dora:  # ‖W0 + sBA‖ and m/‖·‖ per output row of every DoRA layer
        acts += arch.layers * sum(2 * shapes[s][1] for s in p.targets) * act_bytes
    dequant = 0.0
    if p.quantized:
        compute = DTYPE_BYTES.get(
            str(fields.get("compute_dtype", "float32")).replace("torch.", ""), 4
        )
        dequant = max(i * o for i, o, _ in shapes.values()) * compute
        if device == "cpu":
            # peftlab's CPU fallback for widths bitsandbytes' kernel cannot block evenly
            # (in_features % blocksize != 0) dequantizes and calls F.linear: autograd keeps the
            # dequantized weight. bitsandbytes' own MatMul4Bit keeps only the packed weight.
            bs = int(fields.get("blocksize", 64))
            dense = [s for s in p.targets if shapes[s][0] % bs]
            per_block = sum(shapes[s][0] * shapes[s][1] for s in dense)
            qkv = sum(shapes[s][0] * shapes[s][1] for s in dense if s in QKV)
            # Block 0's q/k/v inputs need no gradient (nothing before them trains).
            acts += (per_block if ckpt else arch.layers * per_block - qkv) * compute
    largest = _largest_trainable(arch, p)
    step_ws = largest * train_bytes if opt.step_temporary else 0.0  # fused AdamW: none
    if p.embeddings_trainable and arch.tied_embeddings:
        # A tied input/output embedding gets two gradients in one backward (the LM head's,
        # then the embedding's dense one), summed into a third: two embedding-sized
        # transients on top of every other gradient at the end of backward.
        step_ws += 2 * arch.vocab * arch.hidden * train_bytes
    bwd = acts + loss_ws + dequant + runtime_bytes
    step = grads + step_ws + runtime_bytes
    if bwd >= step:
        gradients, activations, workspace, phase = (
            0.0,
            acts,
            loss_ws + dequant + runtime_bytes,
            "backward start",
        )
    else:
        gradients, activations, workspace, phase = (
            grads,
            0.0,
            step_ws + runtime_bytes,
            "gradients complete",
        )
    inference = _inference_bytes(arch, p, batch_size, seq_len, b, weights, method_params)
    return MemoryEstimate(
        model=arch.name,
        method=name,
        config={"method": name, **fields},
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        optimizer=optimizer,
        gradient_checkpointing=ckpt,
        attention=attention,
        trainable_params=p.trainable,
        total_params=total + method_params,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=activations,
        workspace=workspace,
        phase=phase,
        loaded_weights=total * b,
        inference=inference,
        detail={
            "saved_activations": acts,
            "loss_workspace": loss_ws,
            "dequant_workspace": dequant,
            "all_gradients": grads,
            "runtime_bytes": runtime_bytes,
            "step_workspace": step_ws,
            "quantized_params": p.quantized,
            "quant_bits": p.quant_bits,
            "device": device,
            "activation_bytes_per_element": act_bytes,
            "backward_start_bytes": weights + states + bwd,
            "optimizer_step_bytes": weights + states + step,
        },
    )


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
