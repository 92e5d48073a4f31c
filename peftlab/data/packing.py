"""Sequence packing: several encoded causal-LM examples in one row of up to ``max_length`` tokens.

**Placement.** Examples of lengths ℓ_1..ℓ_n (each ≤ L = ``max_length``, as encoding cut them)
go into rows with Σ ℓ_i ≤ L per row by best-fit decreasing: the examples in order of
decreasing length (ties: the lower index first), each into the open row with the least room
that still holds it, else into a new row. A pure function of the lengths, so the same data
packs the same way in every process and after a resume; it uses at most 11/9·OPT + 6/9 rows.
The loop shuffles the rows per epoch from (seed, epoch), as it shuffles examples unpacked, so
micro-batch m stays a pure function of (seed, m).

**A row.** The examples' tokens one after the other; ``position_ids`` restart at 0 at each
example's first token; ``labels`` are each example's own, except that every example's first
label is -100. A micro-batch of rows is right-padded to its longest row (token ``pad_id``,
positions 0, 1, ... as one more sequence, label -100, ``token_mask`` 0).

**Attention.** Token t of example i attends to token s iff s belongs to example i and s ≤ t:
a block-diagonal causal mask. The model gets ``position_ids`` and no attention mask:
transformers (5.x) then derives exactly this mask from where the positions restart
(``masking_utils.find_packed_sequence_indices``) for eager, sdpa and flex attention, and
flash-attention takes the same positions as variable-length sequences, with no [T, T] mask
(in a batch of one row only, so under flash-attention the rows run laid end to end as one).
It does so only without a KV cache, so a packed forward passes ``use_cache=False``
(:func:`model_inputs`); :func:`separates_examples` checks that a model honours it.

**The loss is exact.** Position t predicts the label at t + 1. Inside example i, position p
sees the tokens of example i at positions 0..p, exactly as unpacked, and predicts the same
label. The last token of example i would predict the first label of example i + 1, which is
-100 (unpacked, an example's first label is never predicted either); padding carries -100.
So the summed loss of a packed row is the sum of its examples' unpacked summed losses, and so
are its gradients, up to float rounding.
"""

from __future__ import annotations

import bisect

import torch

from peftlab.core.config import check
from peftlab.data.encode import IGNORE


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices per row, by best-fit decreasing (see the module docstring).

    Args:
        lengths: every example's token count, each between 1 and ``max_length``.
        max_length: tokens per row.

    Returns:
        One list of example indices per row; every index appears exactly once.
    """
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left → the rows with exactly that room
    rooms: list[int] = []  # sorted rooms that have rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 0 < n <= max_length:
            raise ValueError(f"example {i} has {n} tokens; a row holds 1 to {max_length}")
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):  # the fullest row that still fits
            room = rooms[at]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(r)
    return rows


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows, each a list of encoded examples (``input_ids``, ``labels``).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` and ``token_mask`` (1 on the examples'
        tokens, 0 on padding), each ``[B, T]`` with T the longest row's length.
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[b, at : at + n] = torch.tensor(e["input_ids"])
            labels[b, at + 1 : at + n] = torch.tensor(e["labels"][1:])  # the first stays -100
            positions[b, at : at + n] = torch.arange(n)
            real[b, at : at + n] = 1
            at += n
        positions[b, at:] = torch.arange(width - at)  # the padding: one more sequence
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "token_mask": real}


def model_inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> dict:
    """The keyword arguments ``model`` is called with for ``batch`` (labels aside).

    A packed batch: ``input_ids`` and ``position_ids`` with no attention mask and no cache, so
    that the model builds the block-diagonal causal mask. Under flash-attention, which finds
    packed sequences in a batch of one row only, the rows are laid end to end as one row
    ``[1, B·T]`` (the loss is unchanged: a row's first label is -100, as is padding; labels
    are reshaped to match in :func:`peftlab.train.evaluate.loss_sum`). Otherwise
    ``input_ids`` and ``attention_mask``, and ``token_type_ids`` when the batch has them
    (sentence pairs, :func:`peftlab.data.encode.collate`).
    """
    if "position_ids" not in batch:
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return (
            {**kw, "token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else kw
        )
    ids, positions = batch["input_ids"], batch["position_ids"]
    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model
    if "flash" in str(getattr(config, "_attn_implementation", "")):
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of ``batch`` that belong to examples (not padding)."""
    return int(batch["token_mask" if "position_ids" in batch else "attention_mask"].sum())


@torch.no_grad()
def separates_examples(model: torch.nn.Module) -> bool:
    """Whether ``model``, called as :func:`model_inputs` calls it on a packed batch, keeps
    packed examples apart: in a batch of two rows, the logits of the first row's second
    example must not change when its first example's tokens do. Two forwards of 2 × 8 tokens
    in eval mode."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 32) or 32)

    def example(a: int, b: int) -> dict:
        ids = [(a * k + b) % vocab for k in range(4)]
        return {"input_ids": ids, "labels": ids}

    second, third = example(7, 3), example(3, 11)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout: the two forwards must differ only by the first example
    try:
        out = []
        for first in (example(5, 1), example(5, 2)):
            batch = collate_packed([[first, second], [third, second]], pad_id=0)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**model_inputs(batch, model)).logits
            out.append(logits.reshape(2, 8, -1)[0, 4:].float())
    finally:
        for m, training in modes.items():
            m.training = training
    scale = float(out[0].abs().max()) + 1e-6
    return bool((out[0] - out[1]).abs().max() <= 1e-4 * scale)


def checked_rows(model: torch.nn.Module, lengths: list[int], max_length: int) -> list[list[int]]:
    """:func:`pack_rows`, once :func:`separates_examples` holds for ``model``.

    Raises:
        ConfigError: ``model`` lets packed examples attend to each other (or takes no
            ``position_ids``), so packing would train it on a different loss.
    """
    try:
        apart = separates_examples(model)
    except (TypeError, ValueError, AttributeError):  # no position_ids / use_cache / logits
        apart = False
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    check(
        apart,
        "packing",
        True,
        f"false for {type(model).__name__} (attention {impl!r}): given position ids that "
        f"restart at each example, it still lets packed examples attend to each other",
    )
    return pack_rows(lengths, max_length)
