"""From records to model inputs: prompt formatting, tokenization, train/eval split, collation.

Generation records are rendered with the tokenizer's chat template when it has one (else a
plain "### Instruction / ### Response" layout) and tokenized segment by segment, so labels
are -100 everywhere except on the assistant turns: the loss covers response tokens only.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from peftlab.core.config import check
from peftlab.data import builtin
from peftlab.data.readers import DataError, read_classification, read_generation

IGNORE = -100  # label value cross-entropy skips


@dataclasses.dataclass
class TaskData:
    """Encoded train and eval examples plus what the run reports about them."""

    kind: str
    """"causal-lm" (labels per token) or "classification" (one label per example)."""
    train: list[dict]
    eval: list[dict]
    eval_prompts: list[list[int]]
    """Token ids of each eval example's prompt, for generation (causal-lm only)."""
    eval_answers: list[str]
    """Reference answer of each eval example (causal-lm only)."""
    label_names: list[str]
    """Class names by label id (classification only)."""
    truncated: int
    """Examples cut at max_length (train and eval)."""
    dropped: int
    """Examples dropped: classification rows with an empty text (in data and eval_data,
    before the split), and training examples that truncation left with no response token."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as the text the model sees."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    # No chat template: an Alpaca-style layout; the user turn already ends with the response
    # header, so a prompt is always a prefix of the full conversation.
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(m["content"] + (tokenizer.eos_token or "") + "\n\n")
        elif m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        else:
            parts.append(f"### Instruction:\n{m['content']}\n\n### Response:\n")
    return "".join(parts)


def _leading_special(tokenizer) -> list[int]:
    """The BOS the tokenizer puts in front of a text, if it puts one there."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """``(input_ids, labels, prompt_ids)``: labels are the ids on assistant turns, -100 elsewhere;
    ``prompt_ids`` is everything before the last assistant turn (what generation starts from)."""
    ids = _leading_special(tokenizer)
    labels = [IGNORE] * len(ids)
    done = ""
    prompt_ids: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation, so response tokens cannot be located; use a model whose "
                "template is append-only"
            )
        prompt = tokenizer(before[len(done) :], add_special_tokens=False)["input_ids"]
        answer = tokenizer(through[len(before) :], add_special_tokens=False)["input_ids"]
        ids += prompt
        labels += [IGNORE] * len(prompt)
        prompt_ids = list(ids)
        ids += answer
        labels += answer
        done = through
    return ids, labels, prompt_ids


def _drop_empty(spec: str, records: list[dict], text_column: str) -> tuple[list[dict], int]:
    """Classification records whose text is not empty, and how many were dropped."""
    kept = [r for r in records if "text" not in r or r["text"]]
    if records and not kept:
        raise DataError(
            f"{spec}: every one of the {len(records)} rows has an empty {text_column!r} "
            f"(text_column); nothing to learn from"
        )
    return kept, len(records) - len(kept)


def _int_or_str(s: str):
    try:
        return (0, int(s), s)
    except ValueError:
        return (1, 0, s)


def load_task_data(
    tokenizer,
    data: str,
    kind: str,
    max_length: int,
    eval_size: int = 64,
    eval_data: str | None = None,
    data_size: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
) -> TaskData:
    """Read ``data``, split off ``eval_size`` examples (or read ``eval_data``) and encode them.

    Args:
        data: ``builtin:<task>`` or a path to .json/.jsonl (generation) or .csv/.tsv
            (classification).
        kind: the model's kind; it must match the data's.
        data_size: use at most this many training examples (built-in tasks: generate this
            many; default 2000).
    """
    check(
        data_size is None or (isinstance(data_size, int) and data_size > 0),
        "data_size",
        data_size,
        "null (all the data; builtin tasks: 2000) or a positive integer",
    )
    check(isinstance(eval_size, int) and eval_size >= 0, "eval_size", eval_size, "an integer >= 0")

    def read(spec: str, n_builtin: int) -> tuple[str, list[dict]]:
        if spec.startswith("builtin:"):
            return "causal-lm", builtin.generate(spec.split(":", 1)[1], n_builtin, seed)
        suffix = Path(spec).suffix.lower()
        if suffix in (".json", ".jsonl"):
            return "causal-lm", read_generation(spec)
        if suffix in (".csv", ".tsv"):
            return "classification", read_classification(spec, text_column, label_column)
        raise DataError(
            f"data={spec!r}: expected builtin:<task> ({', '.join(builtin.TASKS)}) or a "
            f".json/.jsonl/.csv/.tsv file"
        )

    n_train = 2000 if data_size is None else data_size
    data_kind, records = read(data, n_train + (0 if eval_data else eval_size))
    if data_kind != kind:
        raise DataError(
            f"data={data!r} is {data_kind} data but the model is a {kind} model; use "
            f"{'a .csv/.tsv file' if kind == 'classification' else 'builtin:<task> or .json/.jsonl'}"
        )
    records, empty = _drop_empty(data, records, text_column)
    if not data.startswith("builtin:"):
        random.Random(seed).shuffle(records)
    if eval_data:
        eval_kind, eval_records = read(eval_data, eval_size)
        if eval_kind != kind:
            raise DataError(f"eval_data={eval_data!r} is {eval_kind} data, unlike data={data!r}")
        eval_records, eval_empty = _drop_empty(eval_data, eval_records, text_column)
        empty += eval_empty
        if eval_size > len(eval_records):
            raise DataError(
                f"eval_size={eval_size} is invalid: eval_data={eval_data!r} holds "
                f"{len(eval_records)} examples; eval_size must be at most {len(eval_records)}"
            )
        eval_records, train_records = eval_records[:eval_size], records
    else:
        if eval_size >= len(records):
            raise DataError(
                f"data={data!r}: no training examples left after holding out "
                f"eval_size={eval_size} of {len(records)}; eval_size must be less than "
                f"{len(records)} (or add data, or set eval_data)"
            )
        eval_records, train_records = records[:eval_size], records[eval_size:]
    train_records = (
        train_records[:n_train] if data_size or data.startswith("builtin:") else train_records
    )

    out = TaskData(kind, [], [], [], [], [], 0, empty)
    encode = _encode_classification if kind == "classification" else _encode_generation
    encode(out, tokenizer, train_records, eval_records, max_length, f"data={data!r}", label_column)
    return out


def _encode_classification(
    out: TaskData,
    tokenizer,
    train: list[dict],
    eval_: list[dict],
    max_length: int,
    where: str,
    label_column: str,
) -> None:
    """Fill ``out`` with token ids and class ids; the classes are the labels seen, sorted."""
    out.label_names = sorted({r["label"] for r in train + eval_}, key=_int_or_str)
    if len(out.label_names) < 2:
        raise DataError(
            f"{where}: label_column={label_column!r} holds the single value "
            f"{out.label_names[0]!r} in all {len(train) + len(eval_)} examples; "
            f"classification needs at least two classes"
        )
    index = {n: i for i, n in enumerate(out.label_names)}
    for split, recs in ((out.train, train), (out.eval, eval_)):
        texts = [r["text"] for r in recs]
        for ids, r in zip(tokenizer(texts)["input_ids"] if texts else [], recs):
            if len(ids) > max_length:
                out.truncated += 1
                ids = ids[: max_length - 1] + ids[-1:]  # keep the closing [SEP]
            split.append({"input_ids": ids, "label": index[r["label"]]})


def _encode_generation(
    out: TaskData,
    tokenizer,
    train: list[dict],
    eval_: list[dict],
    max_length: int,
    where: str,
    label_column: str,
) -> None:
    """Fill ``out`` with token ids and response-only labels, and the eval prompts/answers."""
    for split, recs in ((out.train, train), (out.eval, eval_)):
        for r in recs:
            ids, labels, prompt = encode_messages(tokenizer, r["messages"])
            if len(ids) > max_length:
                out.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE for x in labels[1:]):  # the first label is never predicted
                if split is out.train:
                    out.dropped += 1
                continue
            split.append({"input_ids": ids, "labels": labels})
            if split is out.eval:
                out.eval_prompts.append(prompt)
                out.eval_answers.append(r["messages"][-1]["content"])
    if not out.train:
        raise DataError(
            f"{where}: every training example lost its response to truncation at "
            f"max_length={max_length}; raise max_length"
        )


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch.

    Returns ``input_ids`` and ``attention_mask`` ``[B, T]`` and ``labels``: ``[B, T]`` with
    -100 on padding for causal LMs, ``[B]`` class ids for classification.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    causal = "labels" in examples[0]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if causal else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        if causal:
            labels[i, :n] = torch.tensor(e["labels"])
    if not causal:
        labels = torch.tensor([e["label"] for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
