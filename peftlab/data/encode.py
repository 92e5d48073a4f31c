"""From examples to model inputs: prompt formatting, tokenization (cached), collation.

Generation examples are rendered with the tokenizer's chat template when it has one (else a
plain "### Instruction / ### Response" layout) and tokenized segment by segment, so labels
are -100 everywhere except on the assistant turns: the loss covers response tokens only.
An example longer than ``max_length`` is cut to its first ``max_length`` tokens; one left
with no response token is dropped and counted.

Classification examples are ``text`` or a pair ``(text, text_pair)``: a tokenizer with a
separator token (BERT-style encoders) encodes the pair natively (``[CLS] a [SEP] b [SEP]``,
the longer text cut first); one without (a decoder's) sees :func:`peftlab.data.formats.pair_prompt`.

Tokenization runs as one batched function. Over ``CACHE_MIN`` examples it runs through
``datasets.Dataset.map`` with a cache file in ``$PEFTLAB_CACHE/tokenized`` named by the
``datasets`` fingerprint (``Hasher``) of the examples and of the function, whose closure holds
the tokenizer (vocabulary, chat template, special tokens), ``max_length`` and the label ids,
and of this module's source: change any of them and the cache misses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from peftlab.data.formats import pair_prompt
from peftlab.data.readers import DataError

IGNORE = -100  # label value cross-entropy skips
CACHE_MIN = 2000  # tokenize through datasets.map (and its cache) from this many examples
_BATCH = 1000
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class TaskData:
    """Encoded train, validation and test examples plus what the run reports about them.

    The validation split is what training looks at (periodic evaluation, choosing a
    checkpoint or a setting); the test split is scored once, at the end, and reported apart.
    Every example carries its ``source`` (a name of :attr:`sources`); causal-LM validation
    and test examples also carry ``prompt_ids`` (the tokens generation starts from) and
    ``answer`` (the reference text) for exact match.
    """

    kind: str
    """"causal-lm" (labels per token) or "classification" (one label per example)."""
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: list[str]
    """Class names by label id (classification; for a causal LM, the distinct responses of a
    classification set mapped with columns {text, label})."""
    truncated: int = 0
    """Examples cut at max_length (every split)."""
    dropped: int = 0
    """Examples dropped: classification texts that were empty (every source), and training
    examples that truncation left with no response token."""
    counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Per split: ``read`` (examples given to the encoder), ``truncated``, ``dropped``
    (no response token left after truncation) and ``kept``."""
    lengths: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Per split: the token count of every example read, before truncation."""
    sources: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Per source (its name): weight, examples per split, unique training examples, and
    empty texts dropped."""
    empty: int = 0
    """Classification texts that were empty (dropped; part of ``dropped``)."""

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


KEPT = ("input_ids", "labels", "label", "type_start")
"""What an encoded example keeps for training (beside its source)."""


def encode_splits(
    out: TaskData, tokenizer, splits: dict[str, list[dict]], max_length: int, where: str
) -> None:
    """Tokenize every split's examples into ``out`` (which holds the kind and label names),
    counting what truncation cut and dropped."""
    if out.kind == "classification":
        fn = classification_fn(tokenizer, max_length, {n: i for i, n in enumerate(out.label_names)})
    else:
        fn = generation_fn(tokenizer, max_length)
    every = [ex for name in SPLITS for ex in splits[name]]
    encoded = tokenize([{k: v for k, v in ex.items() if k != "source"} for ex in every], fn)
    at = 0
    for name in SPLITS:
        examples, split = splits[name], getattr(out, name)
        chunk, at = encoded[at : at + len(examples)], at + len(examples)
        cut = sum(e["length"] > max_length for e in chunk)
        for ex, e in zip(examples, chunk):
            if not e["keep"]:
                continue
            kept = {k: e[k] for k in KEPT if k in e}
            if name != "train" and out.kind != "classification":
                kept.update(prompt_ids=e["prompt_ids"], answer=e["answer"])
            split.append({**kept, "source": ex.get("source", "")})
        lost = len(examples) - len(split)
        out.truncated += cut
        out.dropped += lost if name == "train" else 0
        out.lengths[name] = [e["length"] for e in chunk]
        out.counts[name] = {
            "read": len(examples),
            "truncated": cut,
            "dropped": lost,
            "kept": len(split),
        }
    if splits["train"] and not out.train:  # a streamed run encodes its training split later
        raise DataError(
            f"{where}: every training example lost its response to truncation at "
            f"max_length={max_length}; raise max_length"
        )


def classification_fn(tokenizer, max_length: int, index: dict[str, int]):
    """The batched encoder of ``{text, text_pair, label}`` examples."""
    native_pairs = tokenizer.sep_token_id is not None

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts, pairs = batch["text"], batch.get("text_pair") or [None] * len(batch["text"])
        if not native_pairs:
            texts, pairs = [pair_prompt(t, p) for t, p in zip(texts, pairs)], [None] * len(texts)
        ids: list[list[int]] = [[] for _ in texts]
        starts: list[int | None] = [None] * len(texts)  # where segment B starts (pairs)
        single = [i for i, p in enumerate(pairs) if p is None]
        paired = [i for i, p in enumerate(pairs) if p is not None]
        if single:
            for i, x in zip(single, tokenizer([texts[i] for i in single])["input_ids"]):
                ids[i] = x
        if paired:
            enc = tokenizer([texts[i] for i in paired], [pairs[i] for i in paired])
            for n, i in enumerate(paired):
                ids[i], starts[i] = enc["input_ids"][n], _segment_b(enc, n)
        lengths = [len(x) for x in ids]
        for i, x in enumerate(ids):
            if len(x) <= max_length:
                continue
            if pairs[i] is None:
                ids[i] = x[: max_length - 1] + x[-1:]  # keep the closing [SEP]
            else:  # cut the longer text first, keep both separators
                kw = {"truncation": "longest_first", "max_length": max_length}
                enc = tokenizer([texts[i]], [pairs[i]], **kw)
                ids[i], starts[i] = enc["input_ids"][0], _segment_b(enc, 0)
        labels = [index[y] for y in batch["label"]]
        type_start = [len(x) if b is None else b for x, b in zip(ids, starts)]
        return {
            "input_ids": ids,
            "label": labels,
            "type_start": type_start,
            "length": lengths,
            "keep": [True] * len(ids),
        }

    return encode


def _segment_b(encoding, row: int) -> int | None:
    """Where the second text of a pair starts in row ``row`` (its first token type 1), or
    None when the tokenizer gives no token types (e.g. RoBERTa, which has one segment)."""
    types = encoding.get("token_type_ids")
    if types is None or 1 not in types[row]:
        return None
    return types[row].index(1)


def generation_fn(tokenizer, max_length: int):
    """The batched encoder of ``{messages}`` examples: response-only labels, prompt ids and
    reference answers; ``keep`` is false when truncation left no response token."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_ids", "answer")}
        out.update(length=[], keep=[])
        for messages in batch["messages"]:
            ids, labels, prompt = encode_messages(tokenizer, messages)
            out["length"].append(len(ids))
            ids, labels = ids[:max_length], labels[:max_length]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["prompt_ids"].append(prompt)
            out["answer"].append(messages[-1]["content"])
            out["keep"].append(any(x != IGNORE for x in labels[1:]))  # label 0 is never predicted
        return out

    return encode


def tokenize(examples: list[dict], fn) -> list[dict]:
    """``fn`` (a batched encoder) over ``examples``; through ``datasets.map`` and its cache
    from ``CACHE_MIN`` examples on."""
    if not examples:
        return []
    if len(examples) < CACHE_MIN:
        out: list[dict] = []
        for i in range(0, len(examples), _BATCH):
            chunk = examples[i : i + _BATCH]
            cols = fn({k: [ex[k] for ex in chunk] for k in chunk[0]})
            out += [dict(zip(cols, row)) for row in zip(*cols.values())]
        return out
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    from peftlab.data.sources import cache_dir, quiet_datasets

    key = Hasher.hash([Path(__file__).read_bytes(), examples, fn])
    path = cache_dir() / "tokenized" / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_datasets():
        ds = Dataset.from_list(examples).map(
            fn,
            batched=True,
            batch_size=_BATCH,
            remove_columns=list(examples[0]),
            cache_file_name=str(path),
            new_fingerprint=key,
            load_from_cache_file=True,
        )
    return ds.to_list()


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch.

    Returns ``input_ids`` and ``attention_mask`` ``[B, T]`` and ``labels``: ``[B, T]`` with
    -100 on padding for causal LMs, ``[B]`` class ids for classification; and
    ``token_type_ids`` ``[B, T]`` (1 from each pair's second text on, 0 elsewhere and on
    padding) when a sentence pair is in the batch, as the tokenizer would give them.
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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    starts = [e.get("type_start", len(e["input_ids"])) for e in examples]
    if any(b < len(e["input_ids"]) for b, e in zip(starts, examples)):
        b = torch.tensor(starts).unsqueeze(1)
        batch["token_type_ids"] = ((torch.arange(width) >= b) & mask.bool()).long()
    return batch
