"""From records to model inputs: prompt formatting, tokenization, train/validation/test
splits, collation.

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
BUILTIN_TEST = 500  # examples a built-in eval_data generates when test_size is not set


SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class TaskData:
    """Encoded train, validation and test examples plus what the run reports about them.

    The validation split is what training looks at (periodic evaluation, choosing a
    checkpoint or a setting); the test split is scored once, at the end, and reported apart.
    Causal-LM validation and test examples also carry ``prompt_ids`` (the tokens generation
    starts from) and ``answer`` (the reference text) for exact match.
    """

    kind: str
    """"causal-lm" (labels per token) or "classification" (one label per example)."""
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: list[str]
    """Class names by label id (classification only)."""
    truncated: int
    """Examples cut at max_length (every split)."""
    dropped: int
    """Examples dropped: classification rows with an empty text (every file, before the
    split), and training examples that truncation left with no response token."""
    counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Per split: ``read`` (records given to the encoder), ``truncated``, ``dropped``
    (no response token left after truncation) and ``kept``."""

    @property
    def eval(self) -> list[dict]:
        """The validation split (the name before test splits existed)."""
        return self.validation

    @property
    def eval_prompts(self) -> list[list[int]]:
        return [e["prompt_ids"] for e in self.validation]

    @property
    def eval_answers(self) -> list[str]:
        return [e["answer"] for e in self.validation]


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
    *,
    validation_data: str | None = None,
    test_size: int | None = None,
) -> TaskData:
    """Read ``data``, make the train / validation / test splits and encode them.

    The splits are a pure function of the data and ``seed``: the data's records are shuffled
    with ``seed`` (built-in tasks are generated in order from it), then the first
    ``eval_size`` become the validation split (unless ``validation_data`` is given), the next
    ``test_size`` the test split (unless ``eval_data`` is given), and the rest trains.

    Args:
        data: ``builtin:<task>`` or a path to .json/.jsonl (generation) or .csv/.tsv
            (classification).
        kind: the model's kind; it must match the data's.
        eval_size: validation examples: held out from ``data``, or the first of
            ``validation_data``.
        eval_data: the test set, scored once after training (all of it, or its first
            ``test_size`` examples).
        data_size: use at most this many training examples (built-in tasks: generate this
            many; default 2000).
        validation_data: a separate validation file instead of holding examples out.
        test_size: without ``eval_data``, hold out this many examples of ``data`` as the test
            split (default none); with it, use its first ``test_size`` examples.
    """
    check(
        data_size is None or (isinstance(data_size, int) and data_size > 0),
        "data_size",
        data_size,
        "null (all the data; builtin tasks: 2000) or a positive integer",
    )
    check(isinstance(eval_size, int) and eval_size >= 0, "eval_size", eval_size, "an integer >= 0")
    check(
        test_size is None or (isinstance(test_size, int) and test_size >= 0),
        "test_size",
        test_size,
        "null (eval_data: all of it; otherwise no test split) or an integer >= 0",
    )

    def read(spec: str, n_builtin: int, stream: int = 0) -> tuple[str, list[dict]]:
        if spec.startswith("builtin:"):
            # another stream of the generator for a separate validation/test spec, so that it
            # does not repeat the training examples
            task_seed = seed if not stream else seed + stream * 1_000_003
            return "causal-lm", builtin.generate(spec.split(":", 1)[1], n_builtin, task_seed)
        suffix = Path(spec).suffix.lower()
        if suffix in (".json", ".jsonl"):
            return "causal-lm", read_generation(spec)
        if suffix in (".csv", ".tsv"):
            return "classification", read_classification(spec, text_column, label_column)
        raise DataError(
            f"data={spec!r}: expected builtin:<task> ({', '.join(builtin.TASKS)}) or a "
            f".json/.jsonl/.csv/.tsv file"
        )

    def read_other(key: str, spec: str, n: int | None, size_key: str) -> tuple[list[dict], int]:
        kind_, records = read(spec, BUILTIN_TEST if n is None else n, 1 + (key == "eval_data"))
        if kind_ != kind:
            raise DataError(f"{key}={spec!r} is {kind_} data, unlike data={data!r}")
        records, empty = _drop_empty(spec, records, text_column)
        if n is not None and n > len(records):
            raise DataError(
                f"{size_key}={n} is invalid: {key}={spec!r} holds {len(records)} examples; "
                f"{size_key} must be at most {len(records)}"
            )
        return records[:n] if n is not None else records, empty

    n_train = 2000 if data_size is None else data_size
    n_val = 0 if validation_data else eval_size
    n_test = 0 if eval_data else (test_size or 0)
    data_kind, records = read(data, n_train + n_val + n_test)
    if data_kind != kind:
        raise DataError(
            f"data={data!r} is {data_kind} data but the model is a {kind} model; use "
            f"{'a .csv/.tsv file' if kind == 'classification' else 'builtin:<task> or .json/.jsonl'}"
        )
    records, empty = _drop_empty(data, records, text_column)
    if not data.startswith("builtin:"):
        random.Random(seed).shuffle(records)
    if n_val + n_test >= len(records):
        held = f"eval_size={n_val}" + (f" and test_size={n_test}" if n_test else "")
        limit = "eval_size" + (" + test_size" if n_test else "")
        raise DataError(
            f"data={data!r}: no training examples left after holding out {held} of "
            f"{len(records)}; {limit} must be less than {len(records)} (or add data, or set "
            f"validation_data{'' if not n_test else ' or eval_data'})"
        )
    splits = {
        "validation": records[:n_val],
        "test": records[n_val : n_val + n_test],
        "train": records[n_val + n_test :],
    }
    if data_size or data.startswith("builtin:"):
        splits["train"] = splits["train"][:n_train]
    if validation_data:
        splits["validation"], e = read_other(
            "validation_data", validation_data, eval_size, "eval_size"
        )
        empty += e
    if eval_data:
        splits["test"], e = read_other("eval_data", eval_data, test_size, "test_size")
        empty += e

    out = TaskData(kind, [], [], [], [], 0, empty)
    encode = _encode_classification if kind == "classification" else _encode_generation
    encode(out, tokenizer, splits, max_length, f"data={data!r}", label_column)
    return out


def _encode_classification(
    out: TaskData,
    tokenizer,
    splits: dict[str, list[dict]],
    max_length: int,
    where: str,
    label_column: str,
) -> None:
    """Fill ``out`` with token ids and class ids; the classes are the labels seen, sorted."""
    every = [r for name in SPLITS for r in splits[name]]
    out.label_names = sorted({r["label"] for r in every}, key=_int_or_str)
    if len(out.label_names) < 2:
        raise DataError(
            f"{where}: label_column={label_column!r} holds the single value "
            f"{out.label_names[0]!r} in all {len(every)} examples; "
            f"classification needs at least two classes"
        )
    index = {n: i for i, n in enumerate(out.label_names)}
    for name in SPLITS:
        recs, split, cut = splits[name], getattr(out, name), 0
        texts = [r["text"] for r in recs]
        for ids, r in zip(tokenizer(texts)["input_ids"] if texts else [], recs):
            if len(ids) > max_length:
                cut += 1
                ids = ids[: max_length - 1] + ids[-1:]  # keep the closing [SEP]
            split.append({"input_ids": ids, "label": index[r["label"]]})
        out.truncated += cut
        out.counts[name] = {"read": len(recs), "truncated": cut, "dropped": 0, "kept": len(split)}


def _encode_generation(
    out: TaskData,
    tokenizer,
    splits: dict[str, list[dict]],
    max_length: int,
    where: str,
    label_column: str,
) -> None:
    """Fill ``out`` with token ids and response-only labels (and, for validation and test,
    the prompt ids and reference answers)."""
    for name in SPLITS:
        recs, split, cut, lost = splits[name], getattr(out, name), 0, 0
        for r in recs:
            ids, labels, prompt = encode_messages(tokenizer, r["messages"])
            if len(ids) > max_length:
                cut += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE for x in labels[1:]):  # the first label is never predicted
                lost += 1
                continue
            example = {"input_ids": ids, "labels": labels}
            if name != "train":
                example.update(prompt_ids=prompt, answer=r["messages"][-1]["content"])
            split.append(example)
        out.truncated += cut
        out.dropped += lost if name == "train" else 0
        out.counts[name] = {
            "read": len(recs),
            "truncated": cut,
            "dropped": lost,
            "kept": len(split),
        }
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
