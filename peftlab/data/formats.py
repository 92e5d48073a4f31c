"""Record formats: from a raw record (a JSON object, a table row, a dataset row) to an example.

Generation examples are ``{"messages": [{"role", "content"}, ...]}`` ending with an
assistant turn (the response the loss is on). Recognised without any mapping, from the keys
of a file's first record:

============================  ===================================================================
format                        keys
============================  ===================================================================
chat (OpenAI)                 ``messages``: ``[{role: system|user|assistant, content}, ...]``
ShareGPT                      ``conversations``: ``[{from: system|human|gpt, value}, ...]``
                              (and an optional ``system`` string)
Alpaca                        ``instruction``, ``output``, optional ``input`` (joined to the
                              instruction by a blank line)
prompt / completion           ``prompt``, ``completion`` (strings, or lists of chat turns)
question / answer             ``question``, ``answer``
============================  ===================================================================

``columns`` maps other names: ``{prompt, response, system, history}`` (``history``: earlier
``[prompt, response]`` pairs) or ``{messages}`` (a column of chat or ShareGPT turns). For a
causal LM, ``{text, text_pair, label}`` makes a classification set generative: the prompt is
:func:`pair_prompt` of the texts and the response is the label.

Classification examples are ``{"text", "text_pair", "label"}`` (``text_pair`` None for
single texts), from the columns ``columns.text`` / ``text_pair`` / ``label`` (by default
``text_column`` and ``label_column``). An empty text is kept as ``""`` for the caller to drop
and count; an empty label is an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from peftlab.core.config import ConfigError
from peftlab.data.readers import (
    ROLES,
    DataError,
    _json_type,
    missing_column,
    read_json_records,
    read_table,
)

GENERATION_KEYS = ("prompt", "response", "system", "history", "messages")
CLASSIFICATION_KEYS = ("text", "text_pair", "label")
COLUMN_KEYS = GENERATION_KEYS + CLASSIFICATION_KEYS
FORMATS = (
    "chat ('messages'), ShareGPT ('conversations'), Alpaca ('instruction', 'output'), "
    "'prompt'/'completion', 'question'/'answer'"
)
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

Convert = Callable[[str, object], dict]


def pair_prompt(text: str, text_pair: str | None) -> str:
    """The one text a model without a pair encoding (a causal LM) sees for a text pair."""
    return text if text_pair is None else f"Text 1: {text}\nText 2: {text_pair}"


def check_columns(columns: dict | None, key: str = "columns") -> None:
    """Refuse a mapping that is not ``{role: column name}`` with known roles."""
    if columns is None:
        return
    if not isinstance(columns, dict):
        raise ConfigError(
            f"{key}={columns!r} is invalid: a mapping such as {{prompt: question, response: "
            f"answer}} or {{text: sentence1, text_pair: sentence2, label: label}}"
        )
    for role, col in columns.items():
        if role not in COLUMN_KEYS:
            raise ConfigError(f"{key}.{role} is not a column role; roles: {', '.join(COLUMN_KEYS)}")
        if not isinstance(col, str) or not col:
            raise ConfigError(f"{key}.{role}={col!r} is invalid: a column name (a string)")


# ---- generation --------------------------------------------------------------------------------


def generation_converter(
    source: str,
    columns: list[str],
    mapping: dict | None,
    first: tuple[str, object],
    class_names: list[str] | None = None,
    key: str = "columns",
) -> Convert:
    """The function that turns each record of ``source`` into messages.

    Args:
        columns: the source's column names (a table's header, the first record's keys).
        mapping: the ``columns`` roles given for this source, if any.
        first: ``(where, record)`` of the first record, whose keys choose the format.
        class_names: the names of a ClassLabel ``label`` column's ids.
    """
    mapping = dict(mapping or {})
    if mapping:
        for role, col in mapping.items():
            if col not in columns:
                raise missing_column(source, col, f"{key}.{role}", columns, _is_table(source))
        if "label" in mapping or "text" in mapping:
            return _classification_as_generation(mapping, key, class_names)
        if "messages" in mapping:
            return _turns_in(mapping["messages"])
        if not {"prompt", "response"} <= set(mapping):
            raise ConfigError(
                f"{key}={mapping} is incomplete: generation needs prompt and response (with "
                f"optional system and history), or messages"
            )
        return lambda where, r: _mapped(where, r, mapping)
    where, record = first
    keys = set(record) if isinstance(record, dict) else set()
    if "messages" in keys:
        return _chat
    if "conversations" in keys:
        return _turns_in("conversations")
    if keys >= {"prompt", "completion"}:
        return _prompt_completion
    if keys >= {"question", "answer"} and "instruction" not in keys:
        return lambda w, r: _pair(w, r, "question", "answer")
    if "instruction" in keys or not isinstance(record, dict):
        return _alpaca  # its errors name the missing Alpaca field
    raise DataError(
        f"{where}: the record's keys {sorted(keys)} match no known format ({FORMATS}); name "
        f"the columns, e.g. columns: {{prompt: <column>, response: <column>}}"
    )


def _is_table(source: str) -> bool:
    return Path(str(source)).suffix.lower() in (".csv", ".tsv")


def _field(where: str, r: object, key: str) -> object:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(r)}")
    if key not in r:
        raise DataError(f"{where}: missing field {key!r}")
    return r[key]


def _string(where: str, r: dict, key: str, optional: bool = False) -> str | None:
    v = _field(where, r, key) if not optional else r.get(key)
    if optional and v is None:
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(v)}")
    return v


def _turn_pair(prompt: str, response: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {"messages": [user, {"role": "assistant", "content": response}]}


def _alpaca(where: str, r: object) -> dict:
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
    return _turn_pair(prompt, r["output"])


def _pair(where: str, r: object, prompt_key: str, response_key: str) -> dict:
    return _turn_pair(_string(where, r, prompt_key), _string(where, r, response_key))


def _prompt_completion(where: str, r: object) -> dict:
    p, c = _field(where, r, "prompt"), _field(where, r, "completion")
    if isinstance(p, list) and isinstance(c, list):  # conversational prompt / completion
        return _chat(where, {"messages": p + c})
    return _pair(where, r, "prompt", "completion")


def _mapped(where: str, r: object, mapping: dict) -> dict:
    """Messages from mapped prompt / response columns, optional system and history."""
    prompt = _string(where, r, mapping["prompt"])
    response = _string(where, r, mapping["response"])
    system = _string(where, r, mapping["system"], optional=True) if "system" in mapping else None
    msgs = [{"role": "system", "content": system}] if system else []
    col = mapping.get("history")
    history = r.get(col) if col else None
    if history is not None and not isinstance(history, list):
        raise DataError(
            f"{where}: {col!r} (history) must be a list of [prompt, response] pairs, got "
            f"{_json_type(history)}"
        )
    for i, pair in enumerate(history or []):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise DataError(
                f"{where}: {col}[{i}] must be a [prompt, response] pair of strings, got "
                f"{json.dumps(pair)[:60]}"
            )
        msgs += _turn_pair(*pair)["messages"]
    return {"messages": msgs + _turn_pair(prompt, response)["messages"]}


def _chat(where: str, r: object) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages', got {_json_type(r)}")
    if "messages" not in r:
        raise DataError(
            f"{where}: missing field 'messages' (the file's first record is a chat record)"
        )
    return _turns(where, r["messages"], "messages", r)


def _turns_in(column: str) -> Convert:
    return lambda where, r: _turns(where, _field(where, r, column), column, r)


def _turns(where: str, turns: object, name: str, record: dict) -> dict:
    """Messages from a list of OpenAI (role/content) or ShareGPT (from/value) turns."""
    sharegpt = bool(turns) and isinstance(turns, list) and isinstance(turns[0], dict)
    sharegpt = sharegpt and "from" in turns[0]
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    allowed = tuple(SHAREGPT_ROLES) if sharegpt else ROLES
    shape = f"{{{role_key}, {text_key}}}"
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: {name!r} must be a non-empty list of {shape} objects, got "
            f"{'an empty array' if turns == [] else _json_type(turns)}"
        )
    msgs = []
    for i, m in enumerate(turns):
        turn = f"{where}: {name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{turn} must be a {shape} object, got {_json_type(m)}")
        for key in (role_key, text_key):
            if key not in m:
                raise DataError(f"{turn} has no {key!r}; each turn is a {shape} object")
        role = m[role_key]
        if not isinstance(role, str) or role not in allowed:
            raise DataError(
                f"{turn}.{role_key}={role!r} is invalid: {role_key} must be one of {allowed}"
            )
        if not isinstance(m[text_key], str):
            value = m[text_key]
            shown = f" ({json.dumps(value)[:40]})" if value is not None else ""
            raise DataError(
                f"{turn} ({role_key} {role!r}): {text_key} must be a string, got "
                f"{_json_type(value)}{shown}"
            )
        role = SHAREGPT_ROLES[role] if sharegpt else role
        msgs.append({"role": role, "content": m[text_key]})
    if msgs[-1]["role"] != "assistant":
        last = "'gpt'" if sharegpt else "'assistant'"
        raise DataError(
            f"{where}: the last {'turn' if sharegpt else 'message'} must have "
            f"{role_key} {last} (the response to learn)"
        )
    system = record.get("system") if sharegpt and isinstance(record, dict) else None
    if isinstance(system, str) and system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def _classification_as_generation(mapping: dict, key: str, names: list[str] | None) -> Convert:
    """A causal LM learns a classification set as prompt (the texts) → response (the label)."""
    if not {"text", "label"} <= set(mapping):
        raise ConfigError(
            f"{key}={mapping} is incomplete: a classification set needs text and label "
            f"(text_pair is optional)"
        )
    if set(mapping) & {"prompt", "response", "messages", "history"}:
        raise ConfigError(f"{key}={mapping} mixes generation roles with text/label; use one set")
    convert = classification_converter(mapping, names)

    def to_messages(where: str, r: object) -> dict | None:
        ex = convert(where, r)
        if is_empty(ex):
            return None  # dropped and counted, as for a classification model
        return _turn_pair(pair_prompt(ex["text"], ex.get("text_pair")), ex["label"])

    return to_messages


# ---- classification ----------------------------------------------------------------------------


def classification_mapping(
    columns: dict | None, text_column: str, label_column: str
) -> tuple[dict, dict]:
    """``(mapping, keys)``: the column of each classification role and the config key that
    set it (for error messages)."""
    mapping = {"text": text_column, "label": label_column}
    keys = {"text": "text_column", "label": "label_column"}
    for role, col in (columns or {}).items():
        if role not in CLASSIFICATION_KEYS:
            raise ConfigError(
                f"columns.{role} does not apply to a classification model; map "
                f"{', '.join(CLASSIFICATION_KEYS)}"
            )
        mapping[role], keys[role] = col, f"columns.{role}"
    return mapping, keys


def classification_converter(mapping: dict, label_names: list[str] | None = None) -> Convert:
    """The function that turns a record into ``{text, text_pair, label}``; integer labels of a
    dataset with class names (``ClassLabel``) become the names."""
    text_col, pair_col, label_col = mapping["text"], mapping.get("text_pair"), mapping["label"]

    def convert(where: str, r: object) -> dict:
        ex = {"text": _text(where, r, text_col)}
        if pair_col:
            ex["text_pair"] = _text(where, r, pair_col)
        ex["label"] = _label(where, r, label_col, label_names)
        return ex

    return convert


def is_empty(example: dict) -> bool:
    """A classification example with an empty text (or second text): dropped and counted."""
    return not example["text"] or example.get("text_pair") == ""


def _text(where: str, r: dict, col: str) -> str:
    v = _field(where, r, col)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {col!r} must be a string, got {_json_type(v)}")
    return v.strip()


def _label(where: str, r: dict, col: str, names: list[str] | None) -> str:
    v = _field(where, r, col)
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # pandas-written files store integer labels as floats
    if v is None or (isinstance(v, str) and not v.strip()):
        raise DataError(f"{where}: empty value for {col!r} (the label)")
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise DataError(
            f"{where}: the label {col!r} is {_json_type(v)} ({json.dumps(v)[:40]}); a label is "
            f"a class name or an integer class id (regression targets are not supported)"
        )
    if isinstance(v, int) and names is not None:  # a ClassLabel column: ids of named classes
        if not 0 <= v < len(names):
            raise DataError(f"{where}: label {v} of {col!r} is not a class id 0..{len(names) - 1}")
        return names[v]
    return str(v).strip()


# ---- whole files (the readers' public API) -------------------------------------------------------


def read_generation(path: str | Path, columns: dict | None = None) -> list[dict]:
    """Messages of every record of a JSON / JSON Lines file (format chosen by the first record,
    or by ``columns``)."""
    records = read_json_records(path)
    cols = list(records[0][1]) if isinstance(records[0][1], dict) else []
    convert = generation_converter(str(path), cols, columns, records[0])
    return [convert(w, r) for w, r in records]


def read_classification(
    path: str | Path,
    text_column: str,
    label_column: str,
    columns: dict | None = None,
    column_names: list[str] | None = None,
) -> list[dict]:
    """``{text, text_pair, label}`` of every row of a CSV / TSV file.

    A row whose text is empty is returned with ``text == ""`` for the caller to drop and count.
    """
    header, rows = read_table(path, column_names)
    mapping, keys = classification_mapping(columns, text_column, label_column)
    for role in ("text", "label", "text_pair"):
        if role in mapping and mapping[role] not in header:
            raise missing_column(path, mapping[role], keys[role], header, table=True)
    convert = classification_converter(mapping)
    return [convert(w, r) for w, r in rows]
