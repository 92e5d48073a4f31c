"""Streaming (``streaming: true``): training files larger than memory, read as they are trained on.

**Reading.** Each training source is opened with ``datasets.load_dataset(..., streaming=True)``
(a ``save_to_disk`` directory: its memory-mapped dataset's ``to_iterable_dataset()``), an
``IterableDataset`` whose records are parsed block by block as they are drawn. Records are
converted (:mod:`peftlab.data.formats`) and tokenized one at a time, when a micro-batch needs
them; the whole training set is never held.

**Held out.** The validation examples are source i's first ``v_i`` non-empty records in file
order, the test examples (``test_size`` without ``eval_data``) the next ``k_i``, with ``v_i``
and ``k_i`` the mixture's shares of ``eval_size`` and ``test_size`` (largest remainder, as
unstreamed). Training reads the records after them: at most ``data_size`` of them (a mixture:
``data_size · p_i`` of source i). ``validation_data`` and ``eval_data`` are read whole as
unstreamed.

**Order.** In epoch e, source i's training records pass through a buffer shuffle
(``IterableDataset.shuffle(seed=s(seed, e, i), buffer_size=B)``, B = ``shuffle_buffer``): a
buffer of B records; each next record is drawn uniformly from the buffer and its slot refilled
from the file. A mixture draws each next record's source, i with probability ``p_i = w_i / Σ
w``, from a ``random.Random`` seeded by (seed, e); the epoch ends when the drawn source has no
record left (one source: when the file ends). Records that convert to nothing (an empty
classification text) or that truncation leaves without a response token are dropped; the
examples kept fill micro-batches of G = ``batch_size`` × processes in order, an epoch's last
partial micro-batch is dropped, and the next epoch reshuffles with its own seeds.

**Resume.** Micro-batch m is thus a pure function of the data, the seed and m. After each
micro-batch the position (epoch, micro-batches into it, records read from each source,
sources drawn, the first pass's counts) goes into the trainer's state under ``"stream"``,
which every checkpoint saves. A resumed run re-creates epoch e's shuffled streams and skips
the records read (the buffer refills exactly as before; nothing is tokenized), so it goes on
with the very micro-batches the interrupted run would have seen. Asked for a micro-batch with
no matching record, the stream replays from the start: the same result, slower.

**Memory.** Per source: B shuffled records, plus the block the reader parses at a time (JSON
Lines: a pyarrow block of about 10 MB; CSV/TSV: pandas chunks of 10,000 rows; a ``.json``
array file is read whole, so stream JSON Lines), plus the held-out examples, encoded.

**What is counted.** Reads, empty texts, truncations, drops and kept examples of the first
epoch, as far as it has been read (all of it once it has been read through), in
:attr:`TaskData.counts` ``["train"]``, ``truncated``, ``dropped`` and :attr:`TaskData.sources`.
Classification (and a causal LM learning a mapped label column) needs its label set before
the first step: a pass over the training records keeps the distinct labels only.

**Limits.** No packing (it places examples by their lengths, all known up front); no
built-in tasks (generated in memory); epochs are not a length (``max_steps`` is required);
a malformed record is found when the stream reaches it, mid-run.
"""

from __future__ import annotations

import bisect
import copy
import csv
import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftlab.core.config import ConfigError, check
from peftlab.data.encode import KEPT, TaskData, classification_fn, encode_splits, generation_fn
from peftlab.data.formats import Convert, is_empty
from peftlab.data.load import _int_or_str, _one, _Reader, _stat, apportion
from peftlab.data.readers import DataError
from peftlab.data.sources import (
    ARROW_SUFFIXES,
    TEXT_SUFFIXES,
    Source,
    Table,
    _saved_dataset,
    cache_dir,
    parse_sources,
    quiet_datasets,
    source_files,
)

STATE_KEY = "stream"  # the trainer's state entry (checkpointed) that holds the position
_ROW = "__peftlab_row__"  # each record's index in its source, for error messages


@dataclasses.dataclass
class _Pool:
    """One source's training records in file order (an ``IterableDataset``) and how to read them."""

    source: Source
    dataset: Any
    convert: Convert
    share: float


def load_streamed(
    tokenizer,
    data,
    kind: str,
    max_length: int,
    *,
    shuffle_buffer: int = 10_000,
    eval_size: int = 64,
    eval_data=None,
    data_size: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
    validation_data=None,
    test_size: int | None = None,
    columns: dict | None = None,
    column_names: list[str] | None = None,
) -> TaskData:
    """:func:`peftlab.data.load_task_data` for a streamed run: the validation and test splits
    encoded, the training split a :class:`StreamedTrain` (arguments as there, plus
    ``shuffle_buffer``, the records each source's shuffle holds)."""
    check(isinstance(eval_size, int) and eval_size >= 0, "eval_size", eval_size, "an integer >= 0")
    reader = _Reader(kind, seed, text_column, label_column)
    sources = parse_sources(data, "data", columns, column_names)
    for s in sources:
        if s.builtin:
            raise ConfigError(
                f"streaming=True is invalid with data={s.path!r}: built-in tasks are generated "
                f"in memory; set streaming: false"
            )
    shares = [s.weight / sum(t.weight for t in sources) for s in sources]
    vals = apportion(0 if validation_data else eval_size, shares)
    tests = apportion(0 if eval_data else (test_size or 0), shares)
    caps = [data_size] * len(sources)
    if len(sources) > 1:
        caps = apportion(data_size, shares) if data_size else caps
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    pools, stats = [], {}
    for s, share, v, k, cap in zip(sources, shares, vals, tests, caps):
        pool, head, empty = _open_pool(reader, s, share, v + k, cap)
        pools.append(pool)
        splits["validation"] += head[:v]
        splits["test"] += head[v:]
        stats[s.name] = {**_stat(round(share, 6)), "empty": empty, "read_through": False}
    if validation_data:
        spec = _one(validation_data, "validation_data", columns, column_names)
        splits["validation"] = reader.first(spec, "validation_data", eval_size, "eval_size", 1)
    if eval_data:
        spec = _one(eval_data, "eval_data", columns, column_names)
        splits["test"] = reader.first(spec, "eval_data", test_size, "test_size", 2)
    for name in ("validation", "test"):
        for ex in splits[name]:
            stats.setdefault(ex["source"], _stat(None))[name] += 1
    out = TaskData(kind, [], [], [], _label_names(reader, pools, splits), empty=reader.empty)
    out.dropped, out.sources = reader.empty, stats
    encode_splits(out, tokenizer, splits, max_length, "data")
    if kind == "classification":
        fn = classification_fn(tokenizer, max_length, {n: i for i, n in enumerate(out.label_names)})
    else:
        fn = generation_fn(tokenizer, max_length)
    out.train = StreamedTrain(pools, fn, max_length, seed, shuffle_buffer, out)
    return out


def _open_pool(reader: _Reader, s: Source, share: float, held: int, cap: int | None):
    """Source ``s`` opened as a stream: its pool of training records, its first ``held``
    examples (file order) and the empty texts among the records those took."""
    raw = open_stream(s)
    indexed = raw.map(lambda r, i: {_ROW: i}, with_indices=True)
    records = _records(indexed, s)
    first = next(records, None)
    if first is None:
        raise DataError(f"{s.path} holds no examples (the file is empty)")
    table = Table(s, list(first[1]), 0, records=[first], class_names=_class_names(raw))
    table.table = Path(s.path).suffix.lower() in (".csv", ".tsv")
    convert = reader._converter(s, table)
    head: list[dict] = []
    used = empty = 0
    for where, record in itertools.chain([first], records):
        if len(head) == held:
            break
        used += 1
        ex = convert(where, record)
        if ex is None or (reader.kind == "classification" and is_empty(ex)):
            empty += 1
        else:
            head.append({**ex, "source": s.name})
    else:  # the file ended within the held-out examples
        raise DataError(
            f"data={s.name!r}: no training examples left after holding out {held} (eval_size "
            f"+ test_size) of its {len(head)}; lower eval_size (or add data, or set "
            f"validation_data)"
        )
    records.close()
    reader.empty += empty
    reader.empty_by[s.name] = empty
    pool = indexed.skip(used)
    return _Pool(s, pool.take(cap) if cap else pool, convert, share), head, empty


def _label_names(reader: _Reader, pools: list[_Pool], splits: dict[str, list[dict]]) -> list[str]:
    """Class names by id, as unstreamed: ClassLabel names, then the other labels seen, sorted.
    A pass over every training record, keeping the distinct labels only."""
    if reader.kind != "classification" and not reader.labels_from_columns:
        return []

    def label(ex: dict) -> str:
        return ex["label"] if reader.kind == "classification" else ex["messages"][-1]["content"]

    seen = Counter(label(ex) for name in ("validation", "test") for ex in splits[name])
    for p in pools:
        for where, record in _records(p.dataset, p.source):
            ex = p.convert(where, record)
            if ex is not None and not (reader.kind == "classification" and is_empty(ex)):
                seen[label(ex)] += 1
    if len(seen) < 2:
        col, key = next(iter(reader.label_keys.items()), (reader.label_column, "label_column"))
        value = next(iter(seen), None)
        raise DataError(
            f"{key}={col!r} holds the single value {value!r} in all {sum(seen.values())} "
            f"examples; classification needs at least two classes"
        )
    return reader.class_names + sorted(set(seen) - set(reader.class_names), key=_int_or_str)


# ---- the training split ----------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    """Where an epoch's reading is: records read per source, sources drawn, and counts."""

    read: list[int]
    draws: int
    counts: dict


def _zero_counts(n: int) -> dict:
    names = ("read", "empty", "truncated", "dropped", "kept")
    return {**dict.fromkeys(names, 0), "kept_by": [0] * n, "empty_by": [0] * n}


class StreamedTrain:
    """The training split of a streamed run, served micro-batch by micro-batch in stream
    order (see the module docstring); ``len()`` is the examples kept so far in the first
    epoch (all of them once it has been read through)."""

    def __init__(self, pools, encode, max_length: int, seed: int, buffer: int, data: TaskData):
        self.pools, self.encode, self.max_length = pools, encode, max_length
        self.seed, self.buffer, self.data = seed, buffer, data
        shares = list(itertools.accumulate(p.share for p in pools))
        self._bounds = shares[:-1]  # source i is drawn for u in [bounds[i-1], bounds[i])
        # what the held-out examples counted, to which the first epoch's counts add
        self._base = {"truncated": data.truncated, "dropped": data.dropped}
        self._held_empty = [data.sources[p.source.name]["empty"] for p in pools]
        self._restart(None)

    def __len__(self) -> int:
        return self._first_counts()["kept"]

    @property
    def epoch(self) -> float:
        """Epochs done: whole while the first is being read, then fractional."""
        per = (self.first_pass or {}).get("batches")
        return round(self._epoch + self._batch / per, 4) if per else float(self._epoch)

    def micro_batch(self, m: int, size: int, state: dict) -> list[dict]:
        """The ``size`` examples of global micro-batch ``m``; the position after it goes in
        ``state[STATE_KEY]``, from which a resumed run's first call continues."""
        if m != self._next:
            record = state.get(STATE_KEY)
            self._restart(record if record and record["micro_batch"] == m else None)
            while self._next < m:  # no record of m: replay from the start
                self._fill(size)
        batch = self._fill(size)
        state[STATE_KEY] = {
            "micro_batch": self._next,
            "epoch": self._epoch,
            "batch": self._batch,
            **copy.deepcopy(dataclasses.asdict(self._cursor)),
            "first_pass": self.first_pass,
        }
        return batch

    def preview(self, n: int) -> tuple[list[dict], dict]:
        """The first ``n`` examples epoch 0 serves (the order training reads them; each with
        its ``length`` before truncation) and the counts of the records read for them. Reads
        a fresh stream: the training position is untouched."""
        cur = _Cursor([0] * len(self.pools), 0, _zero_counts(len(self.pools)))
        examples = list(itertools.islice(self._read(0, cur), n))
        return examples, cur.counts

    def _restart(self, record: dict | None) -> None:
        rec = record or {"micro_batch": 0, "epoch": 0, "batch": 0, "first_pass": None}
        self._next, self._epoch, self._batch = rec["micro_batch"], rec["epoch"], rec["batch"]
        self.first_pass = copy.deepcopy(rec["first_pass"])
        n = len(self.pools)
        self._cursor = _Cursor(
            list(rec.get("read", [0] * n)),
            rec.get("draws", 0),
            copy.deepcopy(rec.get("counts", _zero_counts(n))),
        )
        self._examples = self._read(self._epoch, self._cursor)
        self._publish()

    def _fill(self, size: int) -> list[dict]:
        batch: list[dict] = []
        while len(batch) < size:
            ex = next(self._examples, None)
            if ex is not None:
                batch.append(ex)
                continue
            if self._batch == 0:  # a whole epoch without one full micro-batch
                raise self._too_small(size)
            if self._epoch == 0:
                self.first_pass = {**copy.deepcopy(self._cursor.counts), "batches": self._batch}
            self._epoch, self._batch, batch = self._epoch + 1, 0, []
            self._cursor = _Cursor([0] * len(self.pools), 0, _zero_counts(len(self.pools)))
            self._examples = self._read(self._epoch, self._cursor)
        self._next, self._batch = self._next + 1, self._batch + 1
        self._publish()
        return batch

    def _seed(self, epoch: int, i: int) -> int:
        return (self.seed * 1_000_003 + epoch) * 1_009 + i

    def _read(self, epoch: int, cur: _Cursor) -> Iterator[dict]:
        """Epoch ``epoch``'s kept examples from ``cur`` on, advancing ``cur`` record by record
        (so at each example it is the position just after it)."""
        streams = []
        for i, p in enumerate(self.pools):
            shuffled = p.dataset.shuffle(seed=self._seed(epoch, i), buffer_size=self.buffer)
            # skipping replays the buffer exactly; the records skipped are not tokenized
            streams.append(itertools.islice(_records(shuffled, p.source), cur.read[i], None))
        draws = random.Random(self._seed(epoch, len(self.pools)))
        for _ in range(cur.draws):
            draws.random()
        while True:
            i = bisect.bisect_right(self._bounds, draws.random())
            got = next(streams[i], None)
            if got is None:
                return
            cur.read[i] += 1
            cur.draws += 1
            ex = self._encode(i, *got, cur.counts)
            if ex is not None:
                yield ex

    def _encode(self, i: int, where: str, record: dict, counts: dict) -> dict | None:
        pool = self.pools[i]
        counts["read"] += 1
        ex = pool.convert(where, record)
        if ex is None or (self.data.kind == "classification" and is_empty(ex)):
            counts["empty"] += 1
            counts["empty_by"][i] += 1
            return None
        e = {k: v[0] for k, v in self.encode({k: [v] for k, v in ex.items()}).items()}
        counts["truncated"] += e["length"] > self.max_length
        if not e["keep"]:
            counts["dropped"] += 1
            return None
        counts["kept"] += 1
        counts["kept_by"][i] += 1
        kept = {k: e[k] for k in (*KEPT, "length") if k in e}
        return {**kept, "source": pool.source.name}

    def _first_counts(self) -> dict:
        return self.first_pass or self._cursor.counts

    def _publish(self) -> None:
        """The first epoch's counts so far into the TaskData the run reports."""
        c, data = self._first_counts(), self.data
        data.counts["train"] = {k: c[k] for k in ("read", "truncated", "dropped", "kept")}
        data.truncated = self._base["truncated"] + c["truncated"]
        data.dropped = self._base["dropped"] + c["dropped"] + c["empty"]
        for i, p in enumerate(self.pools):
            stat = data.sources[p.source.name]
            stat["train"] = stat["unique_train"] = c["kept_by"][i]
            stat["read_through"] = self.first_pass is not None
            stat["empty"] = self._held_empty[i] + c["empty_by"][i]

    def _too_small(self, size: int) -> DataError:
        c = self._cursor.counts
        lost = f"{c['dropped']} lost every response token at max_length={self.max_length}"
        return DataError(
            f"batch_size × processes = {size} exceeds the {c['kept']} training examples of "
            f"epoch {self._epoch}'s stream ({c['read']} records read, {c['empty']} empty, "
            f"{lost}); lower batch_size or add data"
        )


# ---- opening a source as a stream ------------------------------------------------------------


def open_stream(source: Source):
    """``source``'s records as a ``datasets.IterableDataset``, in file order."""
    path = source.path
    found = source_files(source)
    if found is None:
        return _saved_dataset(source).dataset.to_iterable_dataset()
    files, suffix = found
    if suffix not in TEXT_SUFFIXES + ARROW_SUFFIXES:
        raise DataError(
            f"data={path!r}: streaming reads {'/'.join(TEXT_SUFFIXES + ARROW_SUFFIXES)} files, "
            f"globs of them, or a directory written by Dataset.save_to_disk"
        )
    if all(Path(f).stat().st_size == 0 for f in files):
        raise DataError(f"{path} holds no examples (the file is empty)")
    builder, kwargs = suffix[1:].replace("jsonl", "json"), {}
    if suffix in (".csv", ".tsv"):
        builder, kwargs = "csv", _csv_options(source, files, suffix == ".tsv")
    with quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(
                builder,
                data_files=[str(Path(f).resolve()) for f in files],
                split="train",
                streaming=True,
                cache_dir=str(cache_dir() / "datasets"),
                **kwargs,
            )
        except Exception as e:  # pyarrow's errors are long and name no file; keep the gist
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data={path!r}: not a readable {builder} file ({first})") from None


def _csv_options(source: Source, files: list[str], tsv: bool) -> dict:
    """pandas' options for reading CSV/TSV as the strict readers do: every value a string
    (empty stays ""), TSV unquoted (GLUE's stray quotes are text), a BOM skipped."""
    import datasets

    header = source.column_names
    for f in files:
        cols = source.column_names or _header(f, tsv)
        if header is not None and cols != header:
            raise DataError(f"{f}: columns {cols} differ from {files[0]}'s {header}")
        header = cols
    options = {
        "sep": "\t" if tsv else ",",
        "quoting": csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
        "na_filter": False,
        "encoding": "utf-8-sig",
        "features": datasets.Features({c: datasets.Value("string") for c in header}),
    }
    return {**options, "column_names": header} if source.column_names else options


def _header(path: str, tsv: bool) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
            cols = next(csv.reader(f, delimiter="\t" if tsv else ",", quoting=quoting), None)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: the header is not valid UTF-8 ({e.reason}); re-encode it"
        ) from None
    if not cols:
        raise DataError(f"{path} is empty; a data file needs a header row naming its columns")
    dups = sorted(c for c, n in Counter(cols).items() if n > 1)
    if dups:
        raise DataError(f"{path}: the header names column(s) {dups} more than once; rename them")
    return [c.strip() for c in cols]


def _class_names(ds) -> dict[str, list[str]]:
    from datasets import ClassLabel

    features = getattr(ds, "features", None) or {}
    return {c: f.names for c, f in features.items() if isinstance(f, ClassLabel)}


def _records(ds, s: Source) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of each record of ``ds``; a reader's error names the source."""
    try:
        for r in ds:
            yield f"{s.path}: record {r.pop(_ROW)}", r
    except DataError:
        raise
    except Exception as e:  # pyarrow's and pandas' errors are long and name no file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data={s.path!r}: a record is not readable ({first})") from None
