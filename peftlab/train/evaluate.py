"""Evaluation: token loss and perplexity; exact match by greedy generation after answer
extraction; accuracy, macro-F1 and Matthews correlation for classification
(:mod:`peftlab.train.metrics` has the definitions).

The ``*_sums`` functions return numerators and denominators (not ratios) — for
classification the whole confusion matrix — so that several processes can add theirs up
before dividing; :func:`evaluate` does the dividing.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.encode import IGNORE, TaskData, collate
from peftlab.data.packing import model_inputs
from peftlab.train import metrics as M
from peftlab.train.loss import ChunkedLossUnsupported, chunked_loss_sum
from peftlab.train.taskdata import num_labels


def loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of per-token losses, number of tokens)`` for a batch; differentiable.

    Causal LMs: cross-entropy of each response token given the tokens before it (labels
    ``[B, T]``, -100 skipped). Classification: cross-entropy of each example (labels ``[B]``).
    Summing (not averaging) lets the caller normalize by the token count of a whole
    accumulated, multi-process batch. A packed batch (``position_ids``, no attention mask;
    :mod:`peftlab.data.packing`) keeps its examples apart. With ``chunked`` a causal LM's
    loss is computed by :func:`peftlab.train.loss.chunked_loss_sum` (the same value without
    the full logits); a model it cannot serve gets the plain loss, with a warning once per
    model.
    """
    labels, inputs = batch["labels"], model_inputs(batch, model)
    if labels.dim() == 2:  # a packed batch may run as one row
        labels = labels.reshape(inputs["input_ids"].shape)
    if chunked and labels.dim() == 2:
        try:
            return chunked_loss_sum(
                model,
                inputs["input_ids"],
                labels,
                inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
            )
        except ChunkedLossUnsupported as e:
            _warn_plain(model, e)
    logits = model(**inputs).logits
    if labels.dim() == 1:  # classification: logits [B, C]
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.new_tensor(
            labels.numel()
        )
    # logits [B, T, V]: position t predicts token t+1. The labels are shifted (the last
    # position gets IGNORE), not the logits: slicing logits[:, :-1] and flattening it would
    # copy a B×T×V tensor (805 MB at 8 × 512 tokens of a 49k vocabulary).
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE).sum()


_WARNED: weakref.WeakSet = weakref.WeakSet()


def _warn_plain(model: nn.Module, error: Exception) -> None:
    if model not in _WARNED:
        _WARNED.add(model)
        warnings.warn(f"chunked loss unavailable, using the plain loss: {error}", stacklevel=3)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def loss_sums(
    model: nn.Module,
    examples: list[dict],
    pad_id: int,
    batch_size: int,
    device,
    chunked: bool = True,
) -> tuple[float, int]:
    """Summed token loss and token count over ``examples``."""
    total, count = 0.0, 0
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        s, n = loss_sum(model, batch, chunked)
        total, count = total + s.item(), count + int(n)
    return total, count


@torch.no_grad()
def classification_sums(
    model: nn.Module, examples: list[dict], pad_id: int, batch_size: int, device, classes: int
) -> list[float]:
    """``[summed loss, count, *confusion matrix]`` of classification ``examples`` from one
    forward pass per batch: the loss and the argmax predictions share the logits."""
    total, preds = 0.0, []
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(**model_inputs(batch, model)).logits
        total += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        preds += logits.argmax(-1).tolist()
    labels = [int(e["label"]) for e in examples]
    return [total, len(examples), *(x for row in M.confusion(preds, labels, classes) for x in row)]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device,
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, decoded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for chunk in _batches(prompts, batch_size):
        width = max(len(p) for p in chunk)
        # Left padding keeps every prompt's last token at the same position, so the first
        # generated token of each row follows its own prompt.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def exact_match_counts(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    answers: list[str],
    batch_size: int,
    device,
    extractor: str = "exact",
    metric: str | None = None,
) -> tuple[float, ...]:
    """``(hits, total)``: greedy generations whose extracted answer equals the reference's
    (:func:`peftlab.train.metrics.exact_match_hits`); with a user ``metric``, also
    ``(value × total, total)`` (:func:`peftlab.train.metrics.call_user_metric`), sums that
    several processes add into the example-weighted mean of their shards' values."""
    if not prompts:
        return (0, 0, 0.0, 0) if metric else (0, 0)
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    preds = generate(model, tokenizer, prompts, longest + 4, batch_size, device)
    counts = (M.exact_match_hits(preds, answers, extractor), len(answers))
    if metric:
        counts += (M.call_user_metric(metric, preds, answers) * len(answers), len(answers))
    return counts


def evaluate(
    model: nn.Module,
    tokenizer,
    data: TaskData,
    batch_size: int = 16,
    exact_match: bool = False,
    device=None,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[list[float]], list[float]] | None = None,
    extractor: str = "exact",
    chunked: bool = True,
    split: str = "validation",
    metric: str | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on one split of ``data`` ("validation" or "test").

    Returns ``<p>_loss`` and (causal LMs) ``<p>_ppl``; ``<p>_exact_match`` when
    ``exact_match`` (answers compared after ``extractor``); ``<p>_metric`` with a user
    ``metric`` ("module:function", scored on the same generations); ``<p>_accuracy``,
    ``<p>_macro_f1`` and ``<p>_mcc`` for classification. The prefix ``<p>`` is ``eval`` for
    the validation split (what is watched during training) and ``test`` for the test split.
    With ``shard=(rank, world)`` each process takes every world-th example and ``reduce``
    sums the per-process counts.
    ``chunked``: the token loss without the full logits (:func:`loss_sum`).
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split={split!r} must be 'validation' or 'test'")
    prefix = "eval" if split == "validation" else "test"
    device = device or next(model.parameters()).device
    rank, world = shard
    examples = getattr(data, split)[rank::world]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        if data.kind == "classification":
            sums = classification_sums(model, examples, pad, batch_size, device, num_labels(data))
        else:
            sums = list(loss_sums(model, examples, pad, batch_size, device, chunked))
        if data.kind != "classification" and (exact_match or metric):
            sums += exact_match_counts(
                model,
                tokenizer,
                [e["prompt_ids"] for e in examples],
                [e["answer"] for e in examples],
                batch_size,
                device,
                extractor,
                metric,
            )
    finally:
        model.train(was_training)
    if reduce is not None:
        sums = reduce([float(s) for s in sums])
    loss = sums[0] / max(sums[1], 1)
    out = {"loss": loss}
    if data.kind == "classification":
        k = num_labels(data)
        matrix = [sums[2 + i * k : 2 + (i + 1) * k] for i in range(k)]
        out.update(M.classification_metrics(matrix))
    else:
        out["ppl"] = math.exp(min(loss, 50.0))
        if exact_match or metric:
            out["exact_match"] = sums[2] / max(sums[3], 1)
        if metric:
            out["metric"] = sums[4] / max(sums[5], 1)
    return {f"{prefix}_{k}": v for k, v in out.items()}
