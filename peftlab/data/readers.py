"""Dataset readers: Alpaca JSON/JSONL, chat-messages JSONL, CSV/TSV for classification.

Every reader returns plain records in one of two shapes:

- generation: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``
  (an Alpaca record becomes one user turn and one assistant turn);
- classification: ``{"text": str, "label": str}``.

Bad input raises :class:`DataError` naming the file, the line (or record) and the key.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from peftlab.core.config import ConfigError

ROLES = ("system", "user", "assistant")


class DataError(ConfigError):
    """The data is missing, empty or malformed; the message names file, line and key."""


def read_generation(path: str | Path) -> list[dict]:
    """Read Alpaca (``instruction``/``input``/``output``) or chat (``messages``) records.

    ``.jsonl`` files hold one JSON object per line; ``.json`` files hold a JSON array (as
    ``alpaca_data.json``) or, failing that, one object per line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, object]] = []  # (where, record)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        records = [(f"{path}: record {i}", r) for i, r in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
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


def _alpaca_record(where: str, r: object) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(r).__name__}")
    for key in ("instruction", "output"):
        if key not in r:
            raise DataError(
                f"{where}: missing field {key!r}; Alpaca records need 'instruction' and "
                f"'output' ('input' is optional), chat records need 'messages'"
            )
        if not isinstance(r[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(r[key]).__name__}")
    prompt = r["instruction"]
    if r.get("input"):
        prompt += "\n\n" + str(r["input"])
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": r["output"]},
        ]
    }


def _chat_record(where: str, r: object) -> dict:
    if not isinstance(r, dict) or "messages" not in r:
        raise DataError(
            f"{where}: missing field 'messages' (the file's first record is a chat record)"
        )
    msgs = r["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] is missing field 'role' or 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role={m['role']!r} must be one of {ROLES}")
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must have role 'assistant' (the response to learn)"
        )
    return {"messages": [{"role": m["role"], "content": str(m["content"])} for m in msgs]}


def read_classification(path: str | Path, text_column: str, label_column: str) -> list[dict]:
    """Read a CSV (``,``) or TSV (``.tsv``, tab) file with a header row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        # SST-2's TSV quotes nothing; quote characters inside text must stay literal there.
        reader = csv.DictReader(
            f,
            delimiter=delimiter,
            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
        )
        columns = reader.fieldnames or []
        for key, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in columns:
                raise DataError(
                    f"{path}: no column {col!r} (set by {key}); the header has columns {columns}"
                )
        for row in reader:
            text, label = row.get(text_column), row.get(label_column)
            if text is None or label is None or label.strip() == "":
                raise DataError(
                    f"{path}: line {reader.line_num}: missing value for {text_column!r} or {label_column!r}"
                )
            out.append({"text": text.strip(), "label": label.strip()})
    if not out:
        raise DataError(f"{path} holds no examples (only a header, or empty)")
    return out
