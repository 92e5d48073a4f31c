"""Chunked cross-entropy for causal LMs: the output head and the loss over chunks of tokens,
so that neither the full ``[B, T, V]`` logits nor their gradient ever exist.

Definitions. Position t predicts token t+1 (as transformers shifts): the label tokens are the
``n = 1..N`` positions whose next label ``y_n = labels[b, t+1]`` is not -100. With ``h_n`` the
body's last hidden state there,

    u_n = W h_n + b                         (the head, an nn.Linear; W may be tied to the input
                                             embedding)
    z_n = c · tanh(s · u_n / c)             (the model's logit transforms: the scale s =
                                             ``logit_scale`` or 1/``logits_scaling``, the soft cap
                                             c = ``final_logit_softcapping``; each optional)
    L   = Σ_n [logsumexp(z_n) − z_n[y_n]]   (the summed loss; the mean is L / N)

and its gradient, with ``g_n = ∂L/∂u_n = s · (softmax(z_n) − e_{y_n}) ⊙ (1 − (z_n/c)²)``:

    ∂L/∂h_n = g_n W,    ∂L/∂W = Σ_n g_nᵀ h_n,    ∂L/∂b = Σ_n g_n.

``L`` is a scalar, so these are computed chunk by chunk *in the forward* (as Liger's fused
linear cross-entropy does) and the backward only multiplies them by the incoming gradient:
one chunk's ``[c, V]`` logits are the only vocabulary-sized tensor alive, and the head costs
the three matrix products of the plain loss (no recomputation). Only the label tokens go
through the head, so response-only labels also save the head's work on the prompt.

How it runs inside a model: :func:`chunked_loss_sum` calls the model itself (so a
DistributedDataParallel wrapper syncs gradients, accelerate's autocast applies, and the
virtual-token methods' hooks on the transformer body fire) with ``logits_to_keep`` set to no
position, so the model computes no logits; a forward hook on the body (``model.base_model``,
the module those methods hook) takes its last hidden state and computes the loss there, still
inside the model's forward. Models this cannot serve exactly — a head that is not a plain
``nn.Linear``, no ``logits_to_keep``, an unknown logit transform (found by comparing with the
model's own logits once per model) — raise :class:`ChunkedLossUnsupported`; the trainer then
uses the plain loss.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.data.encode import IGNORE
from peftlab.methods._virtual_tokens import transformer_body

LOGIT_BUDGET = 1 << 25
"""Elements of one chunk's logits when ``chunk_size`` is not given (128 MB in float32): 512
tokens of a 49k vocabulary. Smaller chunks save little more and run the head's matrix
products less efficiently (on CPU 128 tokens per chunk cost 40% more than 512)."""

__all__ = ["ChunkedLossUnsupported", "chunked_lm_loss", "chunked_loss_sum"]


class ChunkedLossUnsupported(ConfigError):
    """The model cannot use the chunked loss exactly; use the plain loss."""


@dataclasses.dataclass(frozen=True)
class _Head:
    """The output head and the logit transforms the model applies after it."""

    linear: nn.Linear
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``z`` in float32 for hidden states ``[..., d]``."""
        z = self.linear(hidden).float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def chunked_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The mean cross-entropy over the label tokens of a causal LM, without the full logits.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss`` (the same shift:
    position t predicts ``labels[:, t+1]``; -100 is skipped) and its gradients, within float
    rounding, at O(chunk_size · vocabulary) memory for the logits instead of O(B · T · V).
    Works with any transformers causal LM with a plain ``nn.Linear`` head, adapted by peftlab
    or not, wrapped in DistributedDataParallel or not. Like transformers, NaN when no token
    has a label.

    Args:
        model: the causal LM (or its DDP wrapper).
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` targets, -100 where no loss is taken (padding, prompt tokens).
        attention_mask: ``[B, T]``, as the model takes it.
        chunk_size: label tokens per chunk; default: a power of two that keeps one chunk's
            logits near 2**25 elements (512 tokens for a 49k vocabulary).

    Raises:
        ChunkedLossUnsupported: the model's head or forward cannot be served exactly.
    """
    total, count = chunked_loss_sum(model, input_ids, labels, attention_mask, chunk_size)
    return total / count


def chunked_loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, number of label tokens)``, differentiable; see :func:`chunked_lm_loss`.
    ``position_ids`` (``[B, T]``, with no ``attention_mask``) is how a packed batch is given
    (:mod:`peftlab.data.packing`)."""
    if labels.dim() != 2 or labels.shape != input_ids.shape:
        raise ChunkedLossUnsupported(
            f"labels of shape {tuple(labels.shape)} for input_ids {tuple(input_ids.shape)}: the "
            f"chunked loss takes causal-LM labels [B, T] of the inputs' shape"
        )
    inner = _unwrap(model)
    body, head = _parts(inner)
    extra = {} if position_ids is None else {"position_ids": position_ids}
    _probe(inner, body, head, input_ids, attention_mask, position_ids)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # [B, T]: position t predicts t+1
    keep = targets != IGNORE
    out: dict[str, torch.Tensor] = {}

    def take(module: nn.Module, args, output) -> None:
        if "sum" in out:
            return
        hidden = _last_hidden(output)  # [B, T, d]
        if hidden.shape[:2] != keep.shape:
            raise ChunkedLossUnsupported(
                f"the body of {type(inner).__name__} returned hidden states "
                f"{tuple(hidden.shape)} for labels {tuple(keep.shape)}; the chunked loss needs "
                f"one hidden state per label position"
            )
        out["sum"] = _head_loss(hidden[keep], head, targets[keep], chunk_size)

    handle = body.register_forward_hook(take)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
            **extra,
        )
    finally:
        handle.remove()
    if "sum" not in out:
        raise ChunkedLossUnsupported(
            f"{type(inner).__name__}.forward never called its body {type(body).__name__}"
        )
    return out["sum"], keep.sum()


# ---- the model's parts -----------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (and similar ``.module`` wrappers)."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(
        model, "get_output_embeddings"
    ):
        model = model.module
    return model


def _parts(model: nn.Module) -> tuple[nn.Module, _Head]:
    """The transformer body (``model.base_model``, or the module below it that runs the layers:
    see ``transformer_body``) and the head with its logit transforms."""
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    linear = get_head() if callable(get_head) else None
    if not isinstance(linear, nn.Linear) or type(linear).forward is not nn.Linear.forward:
        raise ChunkedLossUnsupported(
            f"the output head of {name} is {type(linear).__name__}, not a plain nn.Linear; the "
            f"chunked loss needs one (an adapted or quantized head: use the plain loss)"
        )
    if _hooked(linear):
        raise ChunkedLossUnsupported(
            f"the output head of {name} has forward hooks (or a replaced forward), which the "
            f"chunked loss would bypass: it reads the head's weight directly"
        )
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise ChunkedLossUnsupported(f"{name} has no transformer body (base_model) to call")
    body = transformer_body(model)  # OPT's head calls model.decoder, past OPTModel
    if not _takes_logits_to_keep(type(model)):
        raise ChunkedLossUnsupported(
            f"{name}.forward takes no logits_to_keep, so it would compute the full logits anyway"
        )
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(text, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(text, "logits_scaling", None):  # Granite divides
        scale /= float(text.logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3
    return body, _Head(linear, scale, float(softcap) if softcap else None)


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    # The class's forward: accelerate's autocast wrapper on the instance calls it.
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _last_hidden(output) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe(
    model: nn.Module,
    body: nn.Module,
    head: _Head,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Once per (model, head): compare the head's logits on the body's hidden states with the
    model's own logits on a few tokens, so a model whose forward does more than the known
    transforms is refused rather than trained on a different loss."""
    if _PROBED.get(model) is head.linear:
        return
    ids = input_ids[:1, :16]
    mask = attention_mask[:1, :16] if attention_mask is not None else None
    extra = {} if position_ids is None else {"position_ids": position_ids[:1, :16]}
    seen: dict[str, torch.Tensor] = {}

    def take(module, args, output) -> None:
        seen.setdefault("z", head.logits(_last_hidden(output)))

    modes = {m: m.training for m in model.modules()}
    handle = body.register_forward_hook(take)
    try:
        with torch.no_grad():
            model.eval()  # no dropout: both sides must see the same hidden states
            ref = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    ref = getattr(ref, "logits", None) if not isinstance(ref, tuple) else ref[0]
    z = seen.get("z")
    ok = (
        isinstance(ref, torch.Tensor)
        and z is not None
        and ref.shape == z.shape
        and bool(((ref.float() - z).abs().max() <= 1e-3 * ref.float().abs().max() + 1e-6).item())
    )
    if not ok:
        raise ChunkedLossUnsupported(
            f"{type(model).__name__}'s logits are not its head applied to its body's last hidden "
            f"state (with the logit_scale / logits_scaling / final_logit_softcapping its config "
            f"names); the chunked loss cannot reproduce them"
        )
    _PROBED[model] = head.linear


# ---- the loss ----------------------------------------------------------------------------------


def _head_loss(
    hidden: torch.Tensor, head: _Head, targets: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """``Σ_n CE(z_n, y_n)`` for hidden states ``[N, d]`` and targets ``[N]``."""
    linear = head.linear
    chunk = chunk_size or _auto_chunk(linear.out_features)
    if chunk <= 0:
        raise ChunkedLossUnsupported(f"chunk_size={chunk_size} must be a positive integer")
    tensors = (hidden, linear.weight, linear.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(hidden, linear.weight, linear.bias, targets, head, chunk)
    return _forward_and_grads(hidden, linear.weight, linear.bias, targets, head, chunk, ())[0]


def _auto_chunk(vocab: int) -> int:
    c = max(1, LOGIT_BUDGET // max(vocab, 1))
    return max(64, min(8192, 1 << (c.bit_length() - 1)))  # a power of two


class _LinearCrossEntropy(torch.autograd.Function):
    """``Σ_n CE(f(W h_n + b), y_n)`` whose gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, chunk):
        wanted = tuple(
            name
            for name, need in zip(("hidden", "weight", "bias"), ctx.needs_input_grad[:3])
            if need
        )
        loss, grads = _forward_and_grads(hidden, weight, bias, targets, head, chunk, wanted)
        ctx.save_for_backward(*(grads.get(k) for k in ("hidden", "weight", "bias")))
        return loss

    @staticmethod
    def backward(ctx, grad):
        return (*(None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors),) + (
            None,
            None,
            None,
        )


def _forward_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    head: _Head,
    chunk: int,
    wanted: tuple[str, ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss and, for the names in ``wanted``, its gradients (unscaled)."""
    n = hidden.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grads: dict[str, torch.Tensor] = {}
    if "hidden" in wanted:
        grads["hidden"] = torch.empty_like(hidden)
    if "weight" in wanted:
        grads["weight"] = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    if "bias" in wanted:
        grads["bias"] = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    for start in range(0, n, chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]  # [c, d], [c]
        z = F.linear(h, weight, bias).float()  # [c, V]: the only vocabulary-sized tensors
        if head.scale != 1.0:
            z.mul_(head.scale)
        t = None
        if head.softcap:
            t = z.div_(head.softcap).tanh_()
            z = t * head.softcap
        picked = z.gather(1, y[:, None]).squeeze(1)  # [c]
        top = z.amax(dim=-1, keepdim=True)  # [c, 1]
        z.sub_(top).exp_()  # in place: exp(z − max), the chunk's one [c, V] buffer
        norm = z.sum(dim=-1, keepdim=True)
        loss += (top.squeeze(1) + norm.squeeze(1).log() - picked).sum()  # logsumexp − z[y]
        if not wanted:
            continue
        g = z.div_(norm)  # softmax
        g[torch.arange(len(y), device=y.device), y] -= 1.0
        if t is not None:
            g.mul_(t.mul_(t).neg_().add_(1.0))  # d(c·tanh(u/c))/du = 1 − tanh²
        if head.scale != 1.0:
            g.mul_(head.scale)
        g = g.to(weight.dtype)
        if "hidden" in grads:
            grads["hidden"][start : start + chunk] = g @ weight
        if "weight" in grads:
            grads["weight"].addmm_(g.t().to(acc), h.to(acc))
        if "bias" in grads:
            grads["bias"] += g.sum(0, dtype=acc)
    return loss, {k: v.to(weight.dtype) if k != "hidden" else v for k, v in grads.items()}
