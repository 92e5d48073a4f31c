"""Dataset readers: Alpaca JSON/JSONL, chat-messages JSONL, CSV/TSV for classification.

Every reader returns plain records in one of two shapes:

- generation: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``
  (an Alpaca record becomes one user turn and one assistant turn);
- classification: ``{"text": str, "label": str}``; ``text`` may be ``""`` (the caller drops
  and counts such rows).

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


def read_generation(path: str | Path) -> list[dict]:
    """Read Alpaca (``instruction``/``input``/``output``) or chat (``messages``) records.

    ``.jsonl`` files hold one JSON object per line; ``.json`` files hold a JSON array of
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
    first = records[0][1]
    chat = isinstance(first, dict) and "messages" in first
    return [_chat_record(w, r) if chat else _alpaca_record(w, r) for w, r in records]


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


def _alpaca_record(where: str, r: object) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(r)}")
    for key in ("instruction", "output"):
        if key not in r:
            raise DataError(
                f"{where}: missing field {key!r}; Alpaca records need 'instruction' and "
                f"'output' ('input' is optional), chat records need 'messages'"
            )
        if not isinstance(r[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(r[key])}")
    extra = r.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(
            f"{where}: field 'input' must be a string (or absent, or null), got {_json_type(extra)}"
        )
    prompt = r["instruction"]
    if extra:
        prompt += "\n\n" + extra
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": r["output"]},
        ]
    }


def _chat_record(where: str, r: object) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {_json_type(r)}")
    if "messages" not in r:
        raise DataError(
            f"{where}: missing field 'messages' (the file's first record is a chat record)"
        )
    msgs = r["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got "
            f"{'an empty array' if msgs == [] else _json_type(msgs)}"
        )
    for i, m in enumerate(msgs):
        turn = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{turn} must be a {{role, content}} object, got {_json_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{turn} has no {key!r}; each turn is a {{role, content}} object")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{turn}.role={role!r} is invalid: role must be one of {ROLES}")
        if not isinstance(m["content"], str):
            value = m["content"]
            shown = f" ({json.dumps(value)[:40]})" if value is not None else ""
            raise DataError(
                f"{turn} (role {role!r}): content must be a string, got {_json_type(value)}{shown}"
            )
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must have role 'assistant' (the response to learn)"
        )
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


def read_classification(path: str | Path, text_column: str, label_column: str) -> list[dict]:
    """Read a CSV (``,``) or TSV (``.tsv``, tab) file with a header row.

    Every row must have as many fields as the header and a non-empty label; a row whose text is
    empty is returned with ``text == ""`` for the caller to drop and count.
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
    if not rows:
        raise DataError(
            f"{path} is empty; a {'TSV' if tsv else 'CSV'} data file needs a header row naming "
            f"its columns, then one example per line"
        )
    _, header = rows[0]
    dups = sorted(name for name, n in Counter(header).items() if n > 1)
    if dups:
        raise DataError(
            f"{path}: the header names column(s) {dups} more than once, so a value cannot be "
            f"looked up by name; rename the columns so every name is unique"
        )
    for key, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in header:
            close = difflib.get_close_matches(col, header, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{path}: no column {col!r} (set by {key}); the header has columns {header}{hint}"
            )
    t, y = header.index(text_column), header.index(label_column)
    out = []
    for lineno, row in rows[1:]:
        if len(row) != len(header):
            sep = "a tab" if tsv else "a comma (quote such fields)"
            raise DataError(
                f"{path}: line {lineno}: {len(row)} field(s) but the header has {len(header)}; "
                f"every row needs one value per column (a text containing {sep} splits it)"
            )
        if not row[y].strip():
            raise DataError(f"{path}: line {lineno}: empty value for {label_column!r} (the label)")
        out.append({"text": row[t].strip(), "label": row[y].strip()})
    if not out:
        raise DataError(f"{path} holds no examples (only a header)")
    return out


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
