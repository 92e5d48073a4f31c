"""From a training config's data keys to encoded splits: sources, mixtures and splits.

Splits. Each source's rows are visited in a seeded order (a ``random.Random(seed)``
permutation of the row indices; built-in tasks are generated in order from the seed). The
first examples visited form the validation split, the next the test split, the rest trains:
the splits are a pure function of the data and the seed, so a resumed run sees the same ones.
``validation_data`` / ``eval_data`` replace the held-out validation / test examples with a
separate source, read in file order.

Mixtures. ``data`` may list sources with weights ``w_i``; with ``p_i = w_i / Σ w`` the
validation, test and training splits each take ``n · p_i`` examples of source ``i`` (rounded
by largest remainder, so they add up to ``n``). The training size ``n`` is ``data_size``, or,
when it is null, the largest ``n`` no file source has to repeat examples for
(``min_i available_i / p_i``). With ``data_size`` set, a source with fewer examples than its
share is repeated (``unique_train`` < ``train`` in :attr:`TaskData.sources`). Every example
records its source's name.
"""

from __future__ import annotations

import math
import random

from peftlab.core.config import ConfigError, check
from peftlab.data import builtin
from peftlab.data.encode import TaskData, encode_splits
from peftlab.data.formats import (
    classification_converter,
    classification_mapping,
    generation_converter,
    is_empty,
)
from peftlab.data.readers import DataError, missing_column
from peftlab.data.sources import Source, Table, open_source, parse_sources

BUILTIN_SIZE = 2000  # training examples a built-in task generates when data_size is not set
BUILTIN_TEST = 500  # examples a built-in eval_data generates when test_size is not set
_CHUNK = 1024  # rows converted at a time


def load_task_data(
    tokenizer,
    data,
    kind: str,
    max_length: int,
    eval_size: int = 64,
    eval_data=None,
    data_size: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    *,
    validation_data=None,
    test_size: int | None = None,
    columns: dict | None = None,
    column_names: list[str] | None = None,
) -> TaskData:
    """Read ``data``, make the train / validation / test splits and encode them.

    Args:
        data: a source (``builtin:<task>``, a file, a glob, a ``save_to_disk`` directory, or
            ``{path, weight, name, columns, column_names, split}``) or a list of them.
        kind: the model's kind ("causal-lm" or "classification"): how records are read.
        eval_size: validation examples: held out from ``data``, or the first of
            ``validation_data``.
        eval_data: the test source, scored once after training (all of it, or its first
            ``test_size`` examples).
        data_size: training examples (at most, for one source; exactly, for a mixture);
            built-in tasks generate this many (default 2000).
        text_column, label_column: classification columns (``columns`` may override them).
        validation_data: a separate validation source instead of holding examples out.
        test_size: without ``eval_data``, hold out this many examples of ``data`` as the
            test split (default none); with it, use its first ``test_size`` examples.
        columns: roles of the columns (:mod:`peftlab.data.formats`), for every source that
            does not set its own.
        column_names: the columns of headerless CSV/TSV files.
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
    reader = _Reader(kind, seed, text_column, label_column)
    sources = parse_sources(data, "data", columns, column_names)
    n_val = 0 if validation_data else eval_size
    n_test = 0 if eval_data else (test_size or 0)
    splits, stats = _draw_all(reader, sources, n_val, n_test, data_size)
    if validation_data:
        spec = _one(validation_data, "validation_data", columns, column_names)
        splits["validation"] = reader.first(spec, "validation_data", eval_size, "eval_size", 1)
    if eval_data:
        spec = _one(eval_data, "eval_data", columns, column_names)
        splits["test"] = reader.first(spec, "eval_data", test_size, "test_size", 2)
    for name in ("validation", "test"):
        for ex in splits[name]:
            stats.setdefault(ex["source"], _stat(None))[name] += 1
    out = TaskData(kind, [], [], [], reader.label_names(splits), empty=reader.empty)
    out.dropped, out.sources = reader.empty, stats
    where = f"data={data!r}" if isinstance(data, str) else "data"
    encode_splits(out, tokenizer, splits, max_length, where)
    return out


def _one(spec, key: str, columns, column_names) -> Source:
    found = parse_sources(spec, key, columns, column_names)
    if len(found) != 1:
        raise ConfigError(f"{key} takes one source, not a list of {len(found)}")
    return found[0]


def _stat(weight: float | None) -> dict:
    return {"weight": weight, "train": 0, "validation": 0, "test": 0, "unique_train": 0, "empty": 0}


def apportion(n: int, shares: list[float]) -> list[int]:
    """``n`` split by ``shares`` (summing to 1) into integers that add up to ``n``: floors,
    then one more for the largest remainders (ties: the earlier source)."""
    exact = [n * p for p in shares]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def _draw_all(reader: _Reader, sources: list[Source], n_val: int, n_test: int, data_size):
    """The held-out and training examples of every source, and per-source counts."""
    total = sum(s.weight for s in sources)
    shares = [s.weight / total for s in sources]
    vals, tests = apportion(n_val, shares), apportion(n_test, shares)
    tables = [None if s.builtin else open_source(s) for s in sources]
    mixture = len(sources) > 1
    if not mixture:
        trains = [data_size or (BUILTIN_SIZE if sources[0].builtin else None)]
    elif data_size:
        trains = apportion(data_size, shares)
    else:
        room = [
            (t.size - v - k) / p for t, v, k, p in zip(tables, vals, tests, shares) if t is not None
        ]
        trains = apportion(max(0, math.floor(min(room))) if room else BUILTIN_SIZE, shares)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    stats: dict[str, dict] = {}
    for s, table, v, k, n in zip(sources, tables, vals, tests, trains):
        want = None if n is None else v + k + n
        examples = reader.draw(s, table, want)
        if len(examples) <= v + k:
            held = f"eval_size={v}" + (f" and test_size={k}" if k else "")
            limit = "eval_size" + (" + test_size" if k else "")
            raise DataError(
                f"data={s.name!r}: no training examples left after holding out {held} of "
                f"{len(examples)}; {limit} must be less than {len(examples)} (or add data, or "
                f"set validation_data{' or eval_data' if k else ''})"
            )
        train = examples[v + k :]
        if mixture and data_size and len(train) < n:  # a small source weighted up: repeat it
            train = [train[i % len(train)] for i in range(n)]
        splits["validation"] += examples[:v]
        splits["test"] += examples[v : v + k]
        splits["train"] += train
        stats[s.name] = {
            **_stat(round(s.weight / total, 6)),
            "train": len(train),
            "unique_train": len(examples) - v - k,
            "empty": reader.empty_by.get(s.name, 0),
        }
    return splits, stats


class _Reader:
    """Turns sources into examples for one model kind, counting empty texts."""

    def __init__(self, kind: str, seed: int, text_column: str, label_column: str):
        self.kind, self.seed = kind, seed
        self.text_column, self.label_column = text_column, label_column
        self.empty = 0
        self.empty_by: dict[str, int] = {}
        self.label_keys: dict[str, str] = {}  # label column -> the config key that named it
        self.class_names: list[str] = []  # ClassLabel names, in id order
        self.labels_from_columns = False  # a causal LM learning a mapped label column

    def draw(self, s: Source, table: Table | None, n: int | None, stream: int = 0) -> list[dict]:
        """The first ``n`` (all: None) non-empty examples of ``s`` in its seeded order
        (``stream`` > 0: a separate validation/test source, in file order)."""
        if s.builtin:
            if self.kind != "causal-lm":
                raise DataError(
                    f"data={s.path!r} is causal-lm data but the model is a {self.kind} model; "
                    f"use a file with a text and a label column"
                )
            seed = self.seed + stream * 1_000_003  # another stream: no repeated examples
            task = s.path.split(":", 1)[1]
            return [{**r, "source": s.name} for r in builtin.generate(task, n or 0, seed)]
        convert = self._converter(s, table)
        order = list(range(table.size))
        if not stream:
            random.Random(self.seed).shuffle(order)
        out: list[dict] = []
        empty = start = 0
        while start < len(order) and (n is None or len(out) < n):
            # rows are converted in chunks (a dataset's come from one select each), and only
            # until n are found: a large file's rest is never read
            size = _CHUNK if n is None else min(_CHUNK, n - len(out))
            chunk = order[start : start + size]
            start += len(chunk)
            for where, record in table.rows(chunk):
                ex = convert(where, record)
                if ex is None or (self.kind == "classification" and is_empty(ex)):
                    empty += 1
                else:
                    out.append({**ex, "source": s.name})
        if not out and empty:
            col = (s.columns or {}).get("text", self.text_column)
            key = "columns.text" if "text" in (s.columns or {}) else "text_column"
            raise DataError(
                f"{s.path}: every one of the {empty} rows has an empty {col!r} ({key}); "
                f"nothing to learn from"
            )
        self.empty += empty
        self.empty_by[s.name] = self.empty_by.get(s.name, 0) + empty
        return out

    def first(self, s: Source, key: str, n: int | None, size_key: str, stream: int) -> list[dict]:
        """The first ``n`` examples of a separate validation/test source (all: None)."""
        if s.builtin:
            return self.draw(s, None, BUILTIN_TEST if n is None else n, stream)
        examples = self.draw(s, open_source(s), None, stream)
        if n is not None and n > len(examples):
            raise DataError(
                f"{size_key}={n} is invalid: {key}={s.path!r} holds {len(examples)} examples; "
                f"{size_key} must be at most {len(examples)}"
            )
        return examples if n is None else examples[:n]

    def _converter(self, s: Source, table: Table):
        if self.kind == "causal-lm":
            mapping = s.columns or {}
            if "label" in mapping:
                self.labels_from_columns = True
                self.label_keys.setdefault(mapping["label"], "columns.label")
            names = table.class_names.get(mapping.get("label", ""))
            return generation_converter(s.path, table.columns, s.columns, table.first(), names)
        mapping, keys = classification_mapping(s.columns, self.text_column, self.label_column)
        for role in ("text", "label", "text_pair"):
            if role in mapping and mapping[role] not in table.columns:
                raise missing_column(s.path, mapping[role], keys[role], table.columns, table.table)
        self.label_keys.setdefault(mapping["label"], keys["label"])
        names = table.class_names.get(mapping["label"])
        for name in names or []:
            if name not in self.class_names:
                self.class_names.append(name)
        return classification_converter(mapping, label_names=names)

    def label_names(self, splits: dict[str, list[dict]]) -> list[str]:
        """Class names by id: a dataset's ClassLabel names first, then the other labels
        seen, sorted (numbers by value)."""
        if self.kind == "classification":
            seen = [ex["label"] for name in splits for ex in splits[name]]
        elif self.labels_from_columns:
            seen = [ex["messages"][-1]["content"] for name in splits for ex in splits[name]]
        else:
            return []
        distinct = set(seen)
        if len(distinct) < 2:
            col, key = next(iter(self.label_keys.items()), (self.label_column, "label_column"))
            raise DataError(
                f"{key}={col!r} holds the single value {next(iter(distinct))!r} in all "
                f"{len(seen)} examples; classification needs at least two classes"
            )
        extra = sorted(distinct - set(self.class_names), key=_int_or_str)
        return self.class_names + extra


def _int_or_str(s: str):
    try:
        return (0, int(s), s)
    except ValueError:
        return (1, 0, s)
