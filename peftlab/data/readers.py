"""Strict readers for text data files: JSON / JSON Lines records and CSV / TSV tables.

They return raw records, ``(where, record)`` pairs, where ``where`` names the file and the
line (or record) for error messages; :mod:`peftlab.data.formats` turns records into
examples. Tables come back as ``{column: value}`` dicts; a headerless file gets its column
names from ``column_names``.

Files are UTF-8; a leading byte-order mark is skipped (GLUE's MRPC TSVs start with one). CSV
follows RFC 4180 (``"`` quotes a field, ``""`` is a literal quote); TSV quotes nothing, as the
GLUE TSVs are written, so a ``"`` inside a TSV field is text. Bad input raises
:class:`DataError`, one line naming the file, the line (or record) and the key, and what to do.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
from collections import Counter
from pathlib import Path

from peftlab.core.config import ConfigError

ROLES = ("system", "user", "assistant")


class DataError(ConfigError):
    """The data is missing, empty or malformed; the message names file, line and key."""


def _json_type(v: object) -> str:
    """The JSON name of a parsed value's type, as the user wrote it in the file."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(v), type(v).__name__)


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 without a leading byte-order mark.

    Raises:
        DataError: the file is missing, or holds bytes that are not UTF-8 (the message names
            the line and byte offset of the first one).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw[:at].count(b"\n") + 1
        hint = (
            " (it starts with a UTF-16 byte-order mark)"
            if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
            else ""
        )
        raise DataError(
            f"{path}: line {line} (byte {at}): byte 0x{raw[at]:02x} is not "
            f"valid UTF-8{hint}; re-encode the file as UTF-8, e.g. "
            f"`iconv -f cp1252 -t utf-8 {path.name} > fixed{path.suffix}`"
        ) from None


def read_json_records(path: str | Path) -> list[tuple[str, object]]:
    """``(where, value)`` of each record of a JSON Lines file or a JSON array.

    ``.jsonl`` files hold one JSON value per line; ``.json`` files hold a JSON array of
    objects (as ``alpaca_data.json``) or, failing that, one object per line.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path} holds no examples (the file is empty)")
    records: list[tuple[str, object]] = []  # (where, record)
    if path.suffix.lower() == ".json" and not _objects_per_line(path, text):
        records = _json_array(path, text)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.lstrip("\ufeff")  # files joined with `cat` keep each part's BOM
            if not line.strip():
                continue
            try:
                records.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                    f"a .jsonl file needs one JSON object per line"
                ) from None
    if not records:
        raise DataError(f"{path} holds no examples (the file is empty)")
    return records


def _objects_per_line(path: Path, text: str) -> bool:
    """Whether a ``.json`` file holds one object per line (JSON Lines) rather than one value."""
    if not text.lstrip().startswith("{"):
        return False
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return True  # several values: one per line, checked line by line
    if len([ln for ln in text.splitlines() if ln.strip()]) > 1:
        keys = list(whole)[:5]
        raise DataError(
            f"{path}: the top level is one object (keys {keys}), not a list of records; a .json "
            f"data file holds an array of record objects ([{{...}}, {{...}}]) or one per line"
        )
    return True  # one record on one line


def _json_array(path: Path, text: str) -> list[tuple[str, object]]:
    """The records of a ``.json`` file whose top level must be an array of objects."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise DataError(
            f"{path}: the top level is {_json_type(items)}; a .json data file holds an array "
            f"of record objects ([{{...}}, {{...}}]) or one object per line"
        )
    return [(f"{path}: record {i}", r) for i, r in enumerate(items)]


def read_table(
    path: str | Path, column_names: list[str] | None = None
) -> tuple[list[str], list[tuple[str, dict]]]:
    """``(columns, rows)`` of a CSV (``,``) or TSV (``.tsv``, tab) file.

    The first row is the header, unless ``column_names`` names the columns of a headerless
    file. Every row must have one field per column; values are stripped of surrounding
    whitespace. Each row is ``(where, {column: value})``.
    """
    path = Path(path)
    text = read_text(path)
    tsv = path.suffix.lower() == ".tsv"
    # strict: an unterminated quote or text after a closing quote is an error, not a guess.
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
        strict=True,
    )
    rows = _rows(path, reader, tsv)
    if not rows and column_names is None:
        raise DataError(
            f"{path} is empty; a {'TSV' if tsv else 'CSV'} data file needs a header row naming "
            f"its columns, then one example per line"
        )
    header, named_by = (column_names, "column_names") if column_names else (rows[0][1], "header")
    dups = sorted(name for name, n in Counter(header).items() if n > 1)
    if dups:
        raise DataError(
            f"{path}: the {named_by} names column(s) {dups} more than once, so a value cannot be "
            f"looked up by name; rename the columns so every name is unique"
        )
    out = []
    for lineno, row in rows if column_names else rows[1:]:
        if len(row) != len(header):
            sep = "a tab" if tsv else "a comma (quote such fields)"
            raise DataError(
                f"{path}: line {lineno}: {len(row)} field(s) but the {named_by} has "
                f"{len(header)}; every row needs one value per column (a text containing {sep} "
                f"splits it)"
            )
        out.append((f"{path}: line {lineno}", {k: v.strip() for k, v in zip(header, row)}))
    if not out:
        what = "the file is empty" if column_names else "only a header"
        raise DataError(f"{path} holds no examples ({what})")
    return list(header), out


def missing_column(source: object, column: str, key: str, columns: list[str], table: bool):
    """The error for a mapped column that the data does not have; lists the columns."""
    close = difflib.get_close_matches(column, [str(c) for c in columns], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    has = "the header has columns" if table else "its columns are"
    return DataError(f"{source}: no column {column!r} (set by {key}); {has} {columns}{hint}")


def _rows(path: Path, reader, tsv: bool) -> list[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-blank row."""
    rows, start = [], 1
    try:
        for row in reader:
            if row:  # a blank line
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        what = (
            "a quoted field opened here is never closed"
            if "end of data" in str(e)
            else f"malformed {'TSV' if tsv else 'CSV'} ({e})"
        )
        fix = 'close the quote, or write a literal " as ""' if not tsv else "fix the row"
        raise DataError(f"{path}: line {start}: {what}; {fix}") from None
    return rows
