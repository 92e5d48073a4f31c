"""How a classification model turns token states into one vector: the [CLS] pooler or the mean.

A BERT classifier reads ``tanh(W_p h_[CLS] + b_p)``. That is right for a checkpoint whose
pooler was trained (BERT's next-sentence objective), and wrong for a *sentence-embedding*
checkpoint such as all-MiniLM-L6-v2, which was trained to be read as the masked mean of its
token states

    e = Σ_t m_t h_t / Σ_t m_t        (m the attention mask)

and whose [CLS] pooler was never trained (all-MiniLM-L6-v2: ``W_p`` std 0.009, ``b_p`` = 0).
Its pooled [CLS] features vary by 0.036 (std across SST-2 sentences, mean over dimensions)
where the mean embedding varies by 0.25, so a head on the pooler learns ~7× slower: measured
on 768 SST-2 sentences, a linear head alone (48 steps of 16, AdamW) reaches dev accuracy 0.509
(the majority class) at lr 1e-3 and 0.647 at 1e-1 on the pooler, and 0.636 / 0.778 at lr 1e-3 /
1e-2 on the mean. Every method whose effect on the encoder is small at first (prompt,
prefix, P-Tuning v2) is then judged by how fast a head can learn from near-constant features.

``pooling``: ``"auto"`` (default) uses what the checkpoint declares — a sentence-transformers
directory's ``modules.json`` → ``Pooling`` config (mean pooling) or a ``peftlab_pooling`` key
saved in ``config.json`` — and the [CLS] pooler otherwise; ``"cls"`` and ``"mean"`` choose.
Mean pooling replaces the body's pooler by :class:`MeanPooler`, which keeps the old ``dense``
weights (unused) so state dicts, peft files and saved models keep their keys, and the choice
is written to ``config.peftlab_pooling`` so a saved model reloads with it. The
sentence-transformers ``Normalize`` step (unit length, for cosine similarity) is not applied
before a classification head. Mean pooling needs a head that reads the body's pooler (BERT,
ERNIE, Megatron-BERT); other heads read token 0 themselves and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from peftlab.core.config import ConfigError

POOLINGS = ("auto", "cls", "mean")
# Classification heads that read ``body.pooler(last_hidden_state)`` (BertPooler-like).
POOLER_HEADS = ("bert", "ernie", "megatron-bert")
CONFIG_KEY = "peftlab_pooling"


class PoolingError(ConfigError):
    """A pooling the model cannot use (one line: what, and what is allowed)."""


class MeanPooler(nn.Module):
    """The masked mean of the token states, in place of a [CLS] pooler.

    The mask is the one the body was called with (taken by a pre-hook on the body). Where the
    states are longer than the mask — prompt tuning's virtual tokens are prepended inside the
    body — the extra leading positions count as real tokens, as the extended mask does."""

    def __init__(self, dense: nn.Module | None = None):
        super().__init__()
        if dense is not None:
            self.dense = dense  # kept for the state dict's keys; not used
            for p in dense.parameters():
                p.requires_grad_(False)
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t = hidden_states.shape[:2]
        mask = self.mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != b:
            return hidden_states.mean(dim=1)
        mask = mask.to(hidden_states.dtype)
        if mask.shape[1] < t:
            mask = torch.cat([mask.new_ones(b, t - mask.shape[1]), mask], dim=1)
        mask = mask[:, -t:].unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def declared_pooling(directory: str | Path | None, config) -> str:
    """The pooling a checkpoint declares: ``config.peftlab_pooling``, else a
    sentence-transformers ``Pooling`` module's mode (mean → "mean"), else "cls"."""
    saved = getattr(config, CONFIG_KEY, None)
    if saved in ("cls", "mean"):
        return saved
    if directory is None:
        return "cls"
    d = Path(directory)
    try:
        modules = json.loads((d / "modules.json").read_text(encoding="utf-8"))
        pool = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        cfg = json.loads((d / pool.get("path", "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return "cls"
    mean = cfg.get("pooling_mode_mean_tokens") and not cfg.get("pooling_mode_cls_token")
    return "mean" if mean else "cls"


def _body(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


def _capture_mask(module: nn.Module, args, kwargs):
    """Pre-hook on the body: hand its attention mask to its MeanPooler. The pooler is found
    through ``module`` (not captured), so a deep copy of the model feeds its own pooler."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if isinstance(getattr(module, "pooler", None), MeanPooler):
        module.pooler.mask = mask


def apply_pooling(model: nn.Module, pooling: str = "auto", directory=None) -> str:
    """Set the classification model's pooling (see the module doc); returns the one used."""
    if pooling not in POOLINGS:
        raise PoolingError(
            f"pooling: {pooling!r} is not a pooling; use one of {', '.join(POOLINGS)}"
        )
    config = model.config
    chosen = declared_pooling(directory, config) if pooling == "auto" else pooling
    body = _body(model)
    if chosen == "cls":
        return "cls"
    if isinstance(getattr(body, "pooler", None), MeanPooler):
        return "mean"
    pooler = getattr(body, "pooler", None)
    if config.model_type not in POOLER_HEADS or pooler is None:
        if pooling == "auto":
            return "cls"  # the checkpoint's mean is not reachable by this head; keep its own
        raise PoolingError(
            f"pooling: 'mean' needs a classification head that reads the body's pooler "
            f"({', '.join(POOLER_HEADS)}); {config.model_type!r} reads the first token itself "
            f"— use pooling: cls"
        )
    mean = MeanPooler(getattr(pooler, "dense", None))
    body.pooler = mean
    body.register_forward_pre_hook(_capture_mask, with_kwargs=True)
    setattr(config, CONFIG_KEY, "mean")
    return "mean"
