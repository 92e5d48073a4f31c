"""Data sources: what ``data``, ``validation_data`` and ``eval_data`` name, opened for reading.

A source is ``builtin:<task>``, a file, a glob of files, or a directory written by
``datasets.Dataset.save_to_disk``; ``data`` may also be a list of sources with weights (a
mixture), each ``{path, weight, name, columns, column_names, split}``.

Which reader reads what, and why:

- ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv``: peftlab's strict readers
  (:mod:`peftlab.data.readers`). They name the file, line and key of every problem (a
  non-UTF-8 byte and its offset, an unclosed quote, a duplicated header, a row with too many
  fields) where ``datasets``' loaders raise pyarrow or pandas tracebacks, and they read TSV
  as GLUE writes it (no quoting: MRPC's stray ``"`` is text, which pandas' TSV parsing would
  swallow across lines).
- ``.parquet`` / ``.arrow`` files, globs of them, and ``save_to_disk`` directories: the
  ``datasets`` library. Its tables are memory-mapped: rows are converted to Python only when
  drawn (:meth:`Table.rows`), so with ``data_size`` set a file larger than memory costs the
  rows used, not the file. Integer labels of a ``ClassLabel`` column become its class names.

A glob (``data/*.jsonl``) reads every match, in sorted order, with the reader of their common
suffix. By default the training loop draws examples by index (a seeded permutation per
epoch, which is what makes resume exact), so every example must be addressable; memory
mapping gives that without loading the file. ``streaming: true`` reads the training sources
as ``IterableDataset`` streams instead (:mod:`peftlab.data.stream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
from pathlib import Path

from peftlab.core.config import ConfigError, check
from peftlab.data import builtin
from peftlab.data.formats import check_columns
from peftlab.data.readers import DataError, read_json_records, read_table

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
ARROW_SUFFIXES = (".parquet", ".arrow")
SOURCE_KEYS = ("path", "weight", "name", "columns", "column_names", "split")


@dataclasses.dataclass(frozen=True)
class Source:
    """One entry of ``data`` (or ``validation_data`` / ``eval_data``)."""

    path: str
    """builtin:<task>, a file, a glob, or a save_to_disk directory."""
    weight: float = 1.0
    """Share of the training examples in a mixture (weights are normalized)."""
    name: str = ""
    """What summaries call it; default: the path."""
    columns: dict | None = None
    """Column roles for this source (default: the top-level ``columns``)."""
    column_names: list | None = None
    """Column names of a headerless CSV/TSV (default: the top-level ``column_names``)."""
    split: str | None = None
    """The split of a saved DatasetDict (default: train)."""

    @property
    def builtin(self) -> bool:
        return self.path.startswith("builtin:")


def parse_sources(
    spec: object, key: str = "data", columns: dict | None = None, column_names=None
) -> list[Source]:
    """The sources ``spec`` names: a string, a ``{path, ...}`` mapping, or a list of them.

    Raises:
        ConfigError: the structure is not one of these, or a value is out of range.
    """
    check_columns(columns)
    check_column_names(column_names)
    items = spec if isinstance(spec, list) else [spec]
    check(bool(items), key, spec, "a source or a non-empty list of sources")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(spec, list) else key
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(
                f"{where}={item!r} is invalid: {where} must be builtin:<task>, a file, a glob or "
                f"a directory, or a mapping {{path: ..., weight: ...}}, not {type(item).__name__}"
            )
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(SOURCE_KEYS)}")
        path, weight = item.get("path"), item.get("weight", 1.0)
        check(isinstance(path, str) and bool(path), f"{where}.path", path, "a non-empty string")
        check(
            isinstance(weight, int | float) and not isinstance(weight, bool) and weight > 0,
            f"{where}.weight",
            weight,
            "a positive number",
        )
        check_columns(item.get("columns"), f"{where}.columns")
        check_column_names(item.get("column_names"), f"{where}.column_names")
        out.append(
            Source(
                path=path,
                weight=float(weight),
                name=str(item.get("name") or path),
                columns=item.get("columns", columns),
                column_names=item.get("column_names", column_names),
                split=item.get("split"),
            )
        )
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{key}: source name(s) {dup} appear twice; give each a distinct name")
    return out


def check_column_names(names: object, key: str = "column_names") -> None:
    if names is None:
        return
    ok = isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names)
    check(
        ok,
        key,
        names,
        f"a list of column names for a headerless .csv/.tsv file, not {type(names).__name__}",
    )
    dups = sorted({n for n in names if names.count(n) > 1})
    check(not dups, key, names, f"a list of distinct names ({dups} repeated)")


@dataclasses.dataclass
class Table:
    """An opened source: its columns, its size, and its rows drawn by index."""

    source: Source
    columns: list[str]
    size: int
    records: list[tuple[str, object]] | None = None  # read by the strict readers
    dataset: object = None  # a datasets.Dataset (memory-mapped)
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """ClassLabel columns: the class names of each."""
    table: bool = False  # CSV/TSV (its error messages talk of a header)

    def first(self) -> tuple[str, object]:
        return self.rows([0])[0]

    def rows(self, indices: list[int]) -> list[tuple[str, object]]:
        """``(where, record)`` of the rows at ``indices``, in that order."""
        if self.records is not None:
            return [self.records[i] for i in indices]
        got = self.dataset.select(indices).to_list() if indices else []
        return [(f"{self.source.path}: row {i}", r) for i, r in zip(indices, got)]


def source_files(source: Source) -> tuple[list[str], str] | None:
    """The files of a non-builtin ``source`` and their one suffix; None for a directory
    written by ``Dataset.save_to_disk``. DataError/ConfigError for a glob that matches
    nothing, a missing file, mixed kinds, or ``column_names`` on a file that names its own."""
    path = source.path
    if source.column_names is not None and Path(path).suffix.lower() not in (".csv", ".tsv"):
        raise ConfigError(
            f"column_names is for headerless .csv/.tsv files; {path!r} names its own columns"
        )
    if glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise DataError(f"data={path!r} matches no files")
    elif Path(path).is_dir():
        return None
    elif not Path(path).exists():
        raise DataError(f"data file {path} does not exist")
    else:
        files = [path]
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    if len(suffixes) > 1:
        raise DataError(f"data={path!r} matches files of several kinds {suffixes}; use one kind")
    return files, suffixes[0]


def open_source(source: Source) -> Table:
    """Open a non-builtin source for reading (files are read; datasets are mapped)."""
    path = source.path
    found = source_files(source)
    if found is None:
        return _saved_dataset(source)
    files, suffix = found
    if suffix in (".json", ".jsonl"):
        records = [rec for f in files for rec in read_json_records(f)]
        first = records[0][1]
        cols = list(first) if isinstance(first, dict) else []
        return Table(source, cols, len(records), records=records)
    if suffix in (".csv", ".tsv"):
        header, rows = None, []
        for f in files:
            cols, got = read_table(f, source.column_names)
            if header is not None and cols != header:
                raise DataError(f"{f}: columns {cols} differ from {files[0]}'s {header}")
            header, rows = cols, rows + got
        return Table(source, header, len(rows), records=rows, table=True)
    if suffix in ARROW_SUFFIXES:
        return _dataset_table(source, _load_files(suffix[1:], files, path))
    raise DataError(
        f"data={path!r}: expected builtin:<task> ({', '.join(builtin.TASKS)}), a "
        f"{'/'.join(TEXT_SUFFIXES + ARROW_SUFFIXES)} file, a glob of them, or a directory "
        f"written by Dataset.save_to_disk"
    )


@contextlib.contextmanager
def quiet_datasets():
    """``datasets`` without progress bars (a run's own bar is the one to read)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was:
            datasets.enable_progress_bars()


def cache_dir() -> Path:
    """peftlab's cache (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``), as models.py uses."""
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def _load_files(builder: str, files: list[str], spec: str):
    with quiet_datasets() as datasets:
        try:
            if builder == "parquet" and not any(_parquet_rows(f) for f in files):
                raise DataError(f"{spec} holds no examples (the file is empty)")
            return datasets.load_dataset(
                builder,
                data_files=[str(Path(f).resolve()) for f in files],
                split="train",
                cache_dir=str(cache_dir() / "datasets"),
            )
        except DataError:
            raise
        except Exception as e:  # pyarrow's errors are long and name no file; keep the gist
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data={spec!r}: not a readable {builder} file ({first})") from None


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _saved_dataset(source: Source) -> Table:
    path = Path(source.path)
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"data={source.path!r} is a directory but not one written by Dataset.save_to_disk "
            f"(no state.json or dataset_dict.json); name a file or a glob such as "
            f"{source.path.rstrip('/')}/*.parquet"
        )
    with quiet_datasets() as datasets:
        ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = source.split or "train"
        if split not in ds:
            raise DataError(
                f"data={source.path!r} holds the splits {sorted(ds)}, not {split!r}; choose one "
                f"with {{path: {source.path}, split: <name>}}"
            )
        ds = ds[split]
    elif source.split:
        raise DataError(f"data={source.path!r} is one dataset, not a DatasetDict; drop split")
    return _dataset_table(source, ds)


def _dataset_table(source: Source, ds) -> Table:
    from datasets import ClassLabel

    if len(ds) == 0:
        raise DataError(f"{source.path} holds no examples (the dataset is empty)")
    names = {c: f.names for c, f in ds.features.items() if isinstance(f, ClassLabel)}
    return Table(source, list(ds.column_names), len(ds), dataset=ds, class_names=names)
