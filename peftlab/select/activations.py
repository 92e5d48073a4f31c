"""What a training step keeps for backward: each block's saved tensors, activation
checkpointing, and the cross-entropy loss (plain or chunked).

Per token, block ``l`` saves ``A_l`` elements (:func:`block_saved_elements`). With per-layer
activation checkpointing of a set ``S`` of blocks (``peftlab.train.checkpointing``), a
checkpointed block keeps only its input ``x_l`` (``d`` elements) and in backward one
checkpointed block is recomputed at a time:

    saved per token (backward start) = Σ_{l ∉ S} A_l + Σ_{l ∈ S} d

(with ``offload`` on a GPU the inputs wait in CPU memory: the second term leaves the device).
Backward recomputes the checkpointed blocks one at a time, from the top, after the loss's
backward has freed the loss's tensors; while it works on block ``l`` the blocks below keep what
they kept, block ``l``'s tensors are back, and its backward's gradients pass through (the
incoming ``∂x`` and the MLP's: ``∂(gate·up)`` with ``∂up`` or ``∂gate``, ``d + 2i`` per token —
the allocator's peak on tiny Llamas, LoRA/DoRA/full, within 3%):

    recomputing l (per token) = Σ_{k < l} kept_k + A_l + d + 2i       (kept_k: A_k or d)

— a moment of its own, the worst ``l ∈ S``, not a term on top of the backward start (on a tiny
Llama the allocator's peak is the larger of the two, never their sum). Under full
fine-tuning the head's gradient and those of the blocks above ``l`` exist by then too.
``{every: k}`` checkpoints blocks 0, k, 2k, …; ``true`` every block.

The loss of a causal LM over ``B × T`` tokens with a vocabulary of ``V``, in float32:

- **plain** (transformers' loss): by backward the logits are freed (the loop keeps only the
  loss), the cross-entropy has saved its log-softmax (``B·T·V·4`` bytes, an activation), and
  its backward makes two more such tensors (``∂/∂log-softmax``, ``∂/∂logits``: the workspace).
- **chunked** (``peftlab.chunked_lm_loss``): the head and the loss run over chunks of ``c``
  label tokens inside the forward, computing their gradients there; of the ``N = B·(T − 1)``
  label tokens' logits only ``[c, V]`` buffers ever exist. Saved: ``∂L/∂h`` (``N·d``, plus
  ``∂L/∂W`` when the head's weight trains). Workspace, the larger of the end of the forward —
  the body's output (``B·T·d``), its label positions gathered (``N·d``), and the chunk buffers
  ``e·V·(c₁ + c₂)`` (the previous chunk's ``z`` still bound while the next is made;
  ``e`` = 4 bytes of float32 logits, + the 16-bit head output and its 16-bit gradient copy
  when the activations are 16-bit) — and the start of backward (the gradients scaled by the
  incoming one: ``N·d`` and, when the head trains, ``V·d``). The default ``c`` is the
  trainer's: the power of two nearest below ``2²⁵ / V``, clamped to [64, 8192] (512 tokens for
  a 49k vocabulary, 1024 for 32k). A head the method replaces (LoRA/QLoRA/an adapter on
  ``lm_head``) cannot be chunked: the trainer falls back to the plain loss, and so does this.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from peftlab.core.config import check
from peftlab.select.plans import MethodPlan
from peftlab.select.presets import BERT, Architecture

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

LOGIT_BUDGET = 1 << 25
"""Elements of one chunk's logits the trainer's chunked loss aims at when no chunk size is
given (``peftlab.train.loss.LOGIT_BUDGET``; the estimator may not import the trainer)."""

CHECKPOINTING_KEY = "gradient_checkpointing"
CHECKPOINTING_ALLOWED = (
    "false, true (every layer), [layer indices], or a mapping {every: k} / {layers: [i, ...]} "
    "with an optional offload: true|false"
)


def default_chunk(vocab: int) -> int:
    """The trainer's chunk size for a vocabulary of ``vocab``: the power of two at or below
    ``LOGIT_BUDGET / vocab``, clamped to [64, 8192]."""
    c = max(1, LOGIT_BUDGET // max(vocab, 1))
    return max(64, min(8192, 1 << (c.bit_length() - 1)))


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Which blocks are checkpointed (0-based, sorted) and whether their inputs are offloaded."""

    layers: tuple[int, ...] = ()
    offload: bool = False

    def describe(self, num_layers: int) -> str:
        """In words: "checkpointing every layer", "checkpointing every 2nd layer", ..."""
        if not self.layers:
            return "no checkpointing"
        every = self.layers[1] - self.layers[0] if len(self.layers) > 1 else num_layers
        if self.layers == tuple(range(0, num_layers, every)):
            what = "every layer" if every == 1 else f"every {_ordinal(every)} layer"
        else:
            what = f"layers {', '.join(map(str, self.layers))}"
        return f"checkpointing {what}" + (" (inputs offloaded)" if self.offload else "")


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def parse_checkpointing(spec, num_layers: int) -> Checkpointing:
    """The blocks a ``gradient_checkpointing`` value (the training config's) checkpoints.

    ``False``/``None``: none; ``True``: every block; ``[i, ...]``: those; ``{every: k}``: blocks
    0, k, 2k, …; ``{layers: [...]}``; either mapping with ``offload: true|false``.

    Raises:
        ConfigError: any other value, naming the key and what is allowed.
    """
    if spec is None or spec is False:
        return Checkpointing()
    if spec is True:
        return Checkpointing(tuple(range(num_layers)))
    if isinstance(spec, list | tuple):
        return Checkpointing(_layer_indices(spec, spec, num_layers))
    check(isinstance(spec, dict), CHECKPOINTING_KEY, spec, CHECKPOINTING_ALLOWED)
    unknown = sorted(set(spec) - {"every", "layers", "offload"})
    check(not unknown, CHECKPOINTING_KEY, spec, f"{CHECKPOINTING_ALLOWED}; unknown {unknown}")
    both = {"every", "layers"} <= set(spec)
    check(not both, CHECKPOINTING_KEY, spec, "a mapping with every or layers, not both")
    every = spec.get("every", 1)
    ok = isinstance(every, int) and not isinstance(every, bool) and every > 0
    check(ok, CHECKPOINTING_KEY, spec, "a mapping whose every is a positive integer")
    offload = spec.get("offload", False)
    check(isinstance(offload, bool), CHECKPOINTING_KEY, spec, "a mapping whose offload is a bool")
    if "layers" in spec:
        return Checkpointing(_layer_indices(spec["layers"], spec, num_layers), offload)
    return Checkpointing(tuple(range(0, num_layers, every)), offload)


def _layer_indices(values, spec, num_layers: int) -> tuple[int, ...]:
    ok = isinstance(values, list | tuple) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in values
    )
    check(ok, CHECKPOINTING_KEY, spec, f"a list of layer indices in [0, {num_layers})")
    return tuple(sorted(set(values)))


def _lowrank_extra(p: MethodPlan, arch: Architecture, suffixes: set[str]) -> int:
    """Per token: each low-rank target saves A's output (r); DoRA also keeps
    z = W0·x + s·B·A·x (out) for the magnitude's gradient (plus two ``(out,)`` vectors, counted
    per block in :func:`saved_activation_bytes`)."""
    shapes = arch.linear_shapes()
    n = 0
    for s in suffixes & set(p.targets):
        n += p.targets[s]
        if p.dora:
            n += shapes[s][1]
    return n


def _inputs_saved(p: MethodPlan) -> set[str]:
    """Per-block suffixes whose input is saved: low-rank targets (for A's gradient) and IA³
    feed-forward layers (the vector's gradient reads the input it scales)."""
    return set(p.targets) | {s for s, side in p.scaled.items() if side == "in"}


def _ia3_extra(p: MethodPlan, arch: Architecture, suffixes: set[str]) -> int:
    """Per token: an IA³ (or VeRA b) vector on a layer's output saves that output (out),
    before scaling; a VeRA layer also keeps its projection ``A·x`` (``projected``, r)."""
    shapes = arch.linear_shapes()
    n = sum(shapes[s][1] for s, side in p.scaled.items() if side == "out" and s in suffixes)
    return n + sum(w for s, w in p.projected.items() if s in suffixes)


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
    if arch.family == BERT:
        return _bert_block(arch, p, seq, attention, grad_in, training)
    return _llama_block(arch, p, seq, attention, grad_in)


def _bert_block(arch, p, seq, attention, grad_in, training) -> float:
    """:func:`block_saved_elements` of a BERT block (post-norm LayerNorm, GELU, dropout)."""
    h, i = arch.hidden, arch.intermediate
    tk = seq + p.kv_extra
    f = tk / seq
    lin = _inputs_saved(p)
    attn_grad = grad_in or bool((lin | set(p.scaled)) & QKV) or p.kv_extra > 0
    drop = arch.dropout > 0 and training
    n = 0.0
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
    n += _ia3_extra(p, arch, QKV | O_PROJ)
    n += (h if drop else 0) + h + 2  # dropout mask, LayerNorm input, mean and 1/std
    n += h if lin & UP else 0
    n += i + (i if lin & DOWN else 0)  # GELU input; its output for a trained down-projection
    n += _lowrank_extra(p, arch, UP | DOWN) + _adapter_extra(p, arch, DOWN)
    n += _ia3_extra(p, arch, UP | DOWN)
    n += (h if drop else 0) + h + 2
    return n


def _llama_block(arch, p, seq, attention, grad_in) -> float:
    """:func:`block_saved_elements` of a Llama block (pre-norm RMSNorm, gated SiLU MLP)."""
    h, i = arch.hidden, arch.intermediate
    tk = seq + p.kv_extra
    f = tk / seq
    lin = _inputs_saved(p)
    attn_grad = grad_in or bool((lin | set(p.scaled)) & QKV) or p.kv_extra > 0
    n = 0.0
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
            k = arch.q_dim * f if (grad_in or lin & QKV or "self_attn.q_proj" in p.scaled) else 0
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
    n += _ia3_extra(p, arch, QKV | O_PROJ)
    n += h + 1 + (h if p.norms_trainable else 0)
    n += h if lin & UP else 0
    n += 3 * i + (i if lin & DOWN else 0)  # gate (SiLU input), up, SiLU output; their product
    n += _lowrank_extra(p, arch, UP | DOWN) + _adapter_extra(p, arch, DOWN)
    n += _ia3_extra(p, arch, UP | DOWN)
    return n


class Saved(NamedTuple):
    """Bytes of activations at the two moments of backward that hold the most of them."""

    saved: float
    """At backward start: what autograd keeps from the embeddings to the final norm (the
    loss's own are :func:`loss_bytes`'s)."""
    recompute: float
    """While backward recomputes the worst checkpointed block (0 without checkpointing)."""
    recompute_grads: float
    """Gradients backward has made by then (full fine-tuning's head and blocks above)."""


def saved_activation_bytes(
    arch: Architecture,
    p: MethodPlan,
    batch: int,
    seq: int,
    attention: str,
    act_bytes: int,
    ckpt: Checkpointing,
    on_gpu: bool,
    grad_bytes: int = 4,
    training: bool = True,
) -> Saved:
    """Activation bytes under the checkpointing ``ckpt`` (``grad_bytes``: per gradient
    element)."""
    s = seq + p.seq_extra
    tokens = batch * s
    grad0 = p.embeddings_trainable or p.embedding_adapted or p.seq_extra > 0 or bool(ckpt.layers)
    blocks = [
        block_saved_elements(arch, p, s, attention, grad_in=(k > 0 or grad0), training=training)
        for k in range(arch.layers)
    ]
    chosen = set(ckpt.layers)
    # A checkpointed block keeps only its input (unless offloaded off the GPU); in backward one
    # checkpointed block at a time is recomputed.
    x = 0 if (ckpt.offload and on_gpu) else arch.hidden
    per_token = sum(a for k, a in enumerate(blocks) if k not in chosen) + len(chosen) * x
    h = arch.hidden
    if arch.family == BERT:
        emb = (h + 2 + (h if arch.dropout else 0)) if grad0 else 0
        head = 4 * h * batch  # pooler input/tanh output, dropout mask, classifier input ([CLS])
        saved = (per_token + emb) * tokens * act_bytes + head * act_bytes
        below = emb * tokens * act_bytes  # what is still kept below the blocks in backward
    else:
        # The final norm (a trained head's input is the loss's: loss_bytes).
        final = h + 1 + (h if p.norms_trainable else 0)
        saved = (per_token + final) * tokens * act_bytes
        below = 0.0
        if p.prefix_mlp_hidden:  # the reparameterization MLP, run once per block
            mlp = arch.layers * p.kv_extra * 2 * p.prefix_mlp_hidden * act_bytes
            saved, below = saved + mlp, below + mlp
    if p.dora:  # ‖W0 + sBA‖ and m/‖·‖ per output row of every DoRA layer
        shapes = arch.linear_shapes()
        vectors = arch.layers * sum(2 * shapes[s][1] for s in p.targets) * act_bytes
        saved, below = saved + vectors, below + vectors
    if p.dense_deltas:  # weight-sized updates (LoHa), kept per layer until its backward
        shapes = arch.linear_shapes()
        per_block = sum(n * shapes[s][0] * shapes[s][1] for s, n in p.dense_deltas.items())
        dense = arch.layers * per_block * act_bytes
        saved, below = saved + dense, below + dense
    if not chosen:
        return Saved(saved, 0.0, 0.0)
    kept = [x if k in chosen else a for k, a in enumerate(blocks)]
    acts, grads = max(
        (
            (sum(kept[:k]) + blocks[k] + h + 2 * arch.intermediate) * tokens * act_bytes + below,
            _gradients_above(arch, p, k) * grad_bytes,
        )
        for k in chosen
    )
    return Saved(saved, acts, grads)


def _gradients_above(arch: Architecture, p: MethodPlan, k: int) -> int:
    """Gradient elements that exist when backward reaches block ``k``: under full fine-tuning
    the output head's and those of the blocks above ``k`` (the other methods' are small)."""
    if not p.trains_base:
        return 0
    block = sum(i * o + (o if b else 0) for i, o, b in arch.linear_shapes().values())
    block += arch.layer_norm_params()
    if arch.family == BERT:
        head = arch.classifier_params()
    else:
        head = arch.vocab * arch.hidden if p.embeddings_trainable or not arch.tied_embeddings else 0
    return head + (arch.layers - 1 - k) * block


def chunked_loss_applies(arch: Architecture, p: MethodPlan) -> bool:
    """Whether the trainer's chunked loss can serve this model: a causal LM whose output head
    the method leaves a plain linear layer."""
    return arch.family != BERT and not p.head_adapted


def loss_bytes(
    arch: Architecture,
    p: MethodPlan,
    batch: int,
    seq: int,
    act_bytes: int,
    head_bytes: int,
    chunk: int | None,
) -> tuple[float, float]:
    """``(saved bytes, workspace bytes)`` of a causal LM's loss; ``chunk`` None: the plain
    loss, else the chunked one with ``chunk`` label tokens per chunk (see the module
    docstring). ``head_bytes``: bytes per element of the head's weight."""
    if arch.family == BERT:
        return 0.0, 0.0
    if chunk is None:
        # transformers' loss and peftlab.train upcast the logits to float32. The prompt's
        # positions are cut before the head.
        logits = batch * seq * arch.vocab * 4
        head_input = (
            batch * (seq + p.seq_extra) * arch.hidden * act_bytes if p.head_trainable else 0
        )
        return head_input + logits, 2 * logits
    h, v = arch.hidden, arch.vocab
    n = batch * (seq - 1)  # position t predicts t + 1: the last position has no label
    head_trains = p.trains_base and (p.embeddings_trainable or not arch.tied_embeddings)
    head_grad = v * h * head_bytes if head_trains else 0
    saved = n * h * act_bytes + head_grad
    first, second = min(n, chunk), min(chunk, max(0, n - chunk))
    e = 4 + (act_bytes if act_bytes < 4 else 0)  # float32 logits (+ 16-bit output, gradient)
    buffers = e * v * (first + second)
    if head_trains and act_bytes < 4:
        buffers = max(buffers, (e + 4) * v * first)  # the gradient upcast for ∂L/∂W
    accumulator = v * h * (4 - head_bytes) if head_trains and head_bytes < 4 else 0
    body = batch * (seq + p.seq_extra) * h * act_bytes
    forward = body + n * h * act_bytes + buffers + accumulator
    backward = n * h * act_bytes + head_grad
    return saved, max(forward, backward)
