"""Bad data files and values that cannot work: each is refused with one line naming the file,
the line (or turn, or key) and the fix, or read correctly (a BOM, a stray quote in a TSV)."""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pytest
import yaml

from peftlab.core.config import ConfigError
from peftlab.data import DataError, load_task_data, read_classification, read_generation
from peftlab.train import TrainConfig
from tests.tiny_lm import char_tokenizer, save_tiny_lm

ROOT = Path(__file__).resolve().parents[2]
# The shared data folder sits next to the checkout (or next to the folder of worktrees).
MRPC = next(
    (p / "shared" / "data" / "mrpc" for p in ROOT.parents[:2] if (p / "shared" / "data").is_dir()),
    ROOT.parent / "shared" / "data" / "mrpc",
)
ALPACA = {"instruction": "Add", "input": "1 2", "output": "3"}


def _chat(*turns) -> str:
    return json.dumps({"messages": list(turns)})


def _lines(path: Path, lines: list[str], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + ("\n".join(lines) + "\n").encode())
    return path


def _rows(n: int, header: str = "text,label", sep: str = ",") -> list[str]:
    return [header] + [f"example {i}{sep}{i % 2}" for i in range(n)]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- defect 12: duplicate header names --------------------------------------------------------


@pytest.mark.parametrize("name,sep", [("dup.csv", ","), ("dup.tsv", "\t")])
def test_duplicate_header_names_are_refused(tmp_path, name, sep):
    # The second 'label' column is constant: letting it win trained on one class silently.
    rows = [sep.join(["text", "label", "label"])] + [
        sep.join([f"t {i}", str(i % 2), "1"]) for i in range(6)
    ]
    with pytest.raises(DataError) as e:
        read_classification(_lines(tmp_path / name, rows), "text", "label")
    msg = _one_line(e)
    assert f"{name}: the header names column(s) ['label'] more than once" in msg
    assert "rename the columns" in msg


def test_duplicate_of_an_unused_column_is_refused_too(tmp_path):
    path = _lines(tmp_path / "d.csv", ["id,text,id,label", "1,a,2,0", "3,b,4,1"])
    with pytest.raises(DataError, match=r"d\.csv: the header names column\(s\) \['id'\]"):
        read_classification(path, "text", "label")


# -- defect 13: chat turns --------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "turn,expected",
    [
        (
            {"role": "assistant", "content": None},
            "line 2: messages[1] (role 'assistant'): content must be a string, got null",
        ),
        (
            {"role": "assistant", "content": {"text": "x"}},
            "line 2: messages[1] (role 'assistant'): content must be a string, got an object "
            '({"text": "x"})',
        ),
        (
            {"role": "assistant", "content": 42},
            "line 2: messages[1] (role 'assistant'): content must be a string, got a number",
        ),
        (
            {"role": "assistant", "content": ["a", "b"]},
            "line 2: messages[1] (role 'assistant'): content must be a string, got an array",
        ),
        ("hello", "line 2: messages[1] must be a {role, content} object, got a string"),
        ({"content": "x"}, "line 2: messages[1] has no 'role'"),
        ({"role": "assistant"}, "line 2: messages[1] has no 'content'"),
        (
            {"role": "bot", "content": "x"},
            "line 2: messages[1].role='bot' is invalid: role must be one of",
        ),
    ],
)
def test_bad_chat_turns_name_file_line_and_turn(tmp_path, turn, expected):
    good = _chat(USER, {"role": "assistant", "content": "ok"})
    path = _lines(tmp_path / "c.jsonl", [good, _chat(USER, turn)])
    with pytest.raises(DataError) as e:
        read_generation(path)
    assert f"c.jsonl: {expected}" in _one_line(e)


def test_bad_chat_records_and_alpaca_input(tmp_path):
    good = _chat(USER, {"role": "assistant", "content": "ok"})
    for bad, expected in [
        ('{"messages": {"role": "user"}}', "'messages' must be a non-empty list"),
        (
            '{"messages": []}',
            "'messages' must be a non-empty list of {role, content} objects, got an empty array",
        ),
        ("[1, 2]", "expected a JSON object with 'messages', got an array"),
    ]:
        with pytest.raises(DataError, match=re.escape(f"c.jsonl: line 2: {expected}")):
            read_generation(_lines(tmp_path / "c.jsonl", [good, bad]))
    rec = json.dumps({**ALPACA, "input": {"a": 1}})
    with pytest.raises(DataError, match=r"a\.jsonl: line 1: field 'input' must be a string"):
        read_generation(_lines(tmp_path / "a.jsonl", [rec]))
    # null input is no input, as an absent one
    out = read_generation(_lines(tmp_path / "a.jsonl", [json.dumps({**ALPACA, "input": None})]))
    assert out[0]["messages"][0]["content"] == "Add"


# -- encoding, BOM, malformed rows and files --------------------------------------------------


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    good = json.dumps(ALPACA).encode()
    path = tmp_path / "l1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as e:
        read_generation(path)
    at = 2 * (len(good) + 1) + len(b'{"instruction": "caf')
    msg = _one_line(e)
    assert f"l1.jsonl: line 3 (byte {at}): byte 0xe9 is not valid UTF-8" in msg
    assert "re-encode the file as UTF-8" in msg
    csv_path = tmp_path / "l1.csv"
    csv_path.write_bytes(b"text,label\ngood,1\nna\xefve,0\n")
    with pytest.raises(DataError, match=r"l1\.csv: line 3 \(byte 20\): byte 0xef"):
        read_classification(csv_path, "text", "label")
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("text,label\na,1\n".encode("utf-16"))
    with pytest.raises(DataError, match="line 1 .* UTF-16 byte-order mark.*re-encode"):
        read_classification(utf16, "text", "label")


def test_a_byte_order_mark_is_read_correctly(tmp_path):
    bom = codecs.BOM_UTF8
    for name, sep in (("b.csv", ","), ("b.tsv", "\t")):
        rows = read_classification(
            _lines(tmp_path / name, _rows(4, f"label{sep}text", sep), bom), "text", "label"
        )
        assert len(rows) == 4 and rows[0] == {"text": "0", "label": "example 0"}
    expected = read_generation(_lines(tmp_path / "plain.jsonl", [json.dumps(ALPACA)]))
    assert read_generation(_lines(tmp_path / "b.jsonl", [json.dumps(ALPACA)] * 2, bom)) == (
        expected * 2
    )
    assert read_generation(_lines(tmp_path / "b.json", [json.dumps([ALPACA])], bom)) == expected
    # two JSONL files joined with `cat`: the second part's BOM sits mid-file
    joined = tmp_path / "j.jsonl"
    joined.write_bytes(
        bom + json.dumps(ALPACA).encode() + b"\n" + bom + json.dumps(ALPACA).encode()
    )
    assert read_generation(joined) == expected * 2


@pytest.mark.parametrize(
    "name,lines,expected",
    [
        (
            "x.csv",
            ["text,label", "a,1", "b,0,extra"],
            "x.csv: line 3: 3 field(s) but the header has 2",
        ),
        ("x.csv", ["text,label", "a,1", "", "b"], "x.csv: line 4: 1 field(s) but the header has 2"),
        ("x.tsv", ["text\tlabel", "a\t1\tz"], "x.tsv: line 2: 3 field(s) but the header has 2"),
        (
            "x.csv",
            ["text,label", "a,1", '"never closed,0', "c,1"],
            "x.csv: line 3: a quoted field opened here is never closed",
        ),
        ("x.csv", ["text,label", '"a"b,1'], "x.csv: line 2: malformed CSV"),
        ("x.csv", [""], "x.csv is empty; a CSV data file needs a header row"),
        ("x.csv", ["text,label"], "x.csv holds no examples (only a header)"),
        ("x.csv", ["text,label", "a, "], "x.csv: line 2: empty value for 'label'"),
    ],
)
def test_malformed_csv_and_tsv_rows(tmp_path, name, lines, expected):
    with pytest.raises(DataError) as e:
        read_classification(_lines(tmp_path / name, lines), "text", "label")
    assert expected in _one_line(e)


def test_a_zero_byte_csv_is_empty(tmp_path):
    (tmp_path / "z.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"z\.csv is empty"):
        read_classification(tmp_path / "z.csv", "text", "label")


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("n.jsonl", '[1, 2]\n{"a": 1}\n', "n.jsonl: line 1: expected a JSON object, got an array"),
        ("n.jsonl", '{"instruction": "a", "output": "b"}\nnot json\n', "n.jsonl: line 2: malformed"),
        ("t.json", '{\n  "data": [{"instruction": "a", "output": "b"}]\n}\n', "t.json: the top level is one object (keys ['data'])"),
        ("t.json", '"just a string"', "t.json: the top level is a string"),
        ("t.json", "42", "t.json: the top level is a number"),
        ("t.json", '[{"instruction": "a", "output": "b"}, 7]', "t.json: record 1: expected a JSON object, got a number"),
        ("t.json", "[\n{\"instruction\": \"a\",\n", "t.json: line 3: malformed JSON"),
        ("t.json", "  \n\n", "t.json holds no examples (the file is empty)"),
    ],
)  # fmt: skip
def test_malformed_json_files(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as e:
        read_generation(tmp_path / name)
    assert expected in _one_line(e)


def test_json_objects_one_per_line_in_a_json_file_still_read(tmp_path):
    path = _lines(tmp_path / "l.json", [json.dumps(ALPACA)] * 3)
    assert len(read_generation(path)) == 3
    assert len(read_generation(_lines(tmp_path / "one.json", [json.dumps(ALPACA)]))) == 1


def test_tsv_quotes_are_text(tmp_path):
    # GLUE TSVs quote nothing: a lone " opens no quoted field, and "" stays two characters.
    rows = [
        "label\tsentence",
        '1\the said " hello',
        "0\tplain",
        '1\t" quoted " and "" two',
        "0\tend",
    ]
    out = read_classification(_lines(tmp_path / "q.tsv", rows), "sentence", "label")
    assert [r["text"] for r in out] == ['he said " hello', "plain", '" quoted " and "" two', "end"]


@pytest.mark.skipif(not MRPC.is_dir(), reason=f"shared MRPC data not found at {MRPC}")
def test_real_mrpc_tsv_with_bom_and_stray_quotes():
    dev = read_classification(MRPC / "dev.tsv", "#1 String", "Quality")
    assert len(dev) == 408 and {r["label"] for r in dev} == {"0", "1"}
    assert sum(r["label"] == "1" for r in dev) == 279  # SOURCE.md: 279 of 408 are paraphrases
    train = read_classification(MRPC / "train.tsv", "#2 String", "Quality")
    assert len(train) == 3667 and any('"' in r["text"] for r in train)


# -- values that cannot work ------------------------------------------------------------------


@pytest.fixture
def tok():
    return char_tokenizer()


def test_data_size_and_eval_size_must_be_usable(tmp_path, tok):
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=f"data_size={bad} is invalid: .*positive integer"):
            TrainConfig(data_size=bad)
        with pytest.raises(ConfigError, match=f"data_size={bad} is invalid"):
            load_task_data(tok, "builtin:sort", "causal-lm", 64, eval_size=4, data_size=bad)
    with pytest.raises(ConfigError, match="eval_size=-1 is invalid"):
        load_task_data(tok, "builtin:sort", "causal-lm", 64, eval_size=-1)
    data = _lines(tmp_path / "d.csv", _rows(10))
    with pytest.raises(DataError) as e:
        load_task_data(tok, str(data), "classification", 32, eval_size=10)
    msg = _one_line(e)
    assert "holding out eval_size=10 of 10; eval_size must be less than 10" in msg
    small = _lines(tmp_path / "e.csv", _rows(3))
    with pytest.raises(
        DataError,
        match=r"eval_size=5 is invalid: validation_data='.*e\.csv' holds 3 examples; eval_size must be at most 3",
    ):
        load_task_data(tok, str(data), "classification", 32, eval_size=5, validation_data=str(small))  # fmt: skip
    d = load_task_data(tok, str(data), "classification", 32, eval_size=3, validation_data=str(small))  # fmt: skip
    assert len(d.eval) == 3 and len(d.train) == 10


def test_one_class_is_refused(tmp_path, tok):
    path = _lines(tmp_path / "one.csv", ["text,stars"] + [f"t {i},5" for i in range(8)])
    with pytest.raises(DataError) as e:
        load_task_data(tok, str(path), "classification", 32, eval_size=2, label_column="stars")
    msg = _one_line(e)
    assert "label_column='stars' holds the single value '5' in all 8 examples" in msg
    assert "at least two classes" in msg


def test_missing_columns_list_the_header(tmp_path, tok):
    path = _lines(tmp_path / "c.csv", _rows(4, "sentence,Label"))
    with pytest.raises(DataError) as e:
        load_task_data(tok, str(path), "classification", 32, eval_size=1, text_column="sentence")
    msg = _one_line(e)
    assert (
        "no column 'label' (set by label_column); the header has columns ['sentence', 'Label']"
        in msg
    )
    assert "(did you mean 'Label'?)" in msg
    with pytest.raises(DataError, match=r"no column 'text' \(set by text_column\)"):
        load_task_data(tok, str(path), "classification", 32, eval_size=1, label_column="Label")


def test_empty_texts_are_dropped_and_counted(tmp_path, tok):
    rows = _rows(10) + [",0", "  ,1", '"",1']
    d = load_task_data(tok, str(_lines(tmp_path / "e.csv", rows)), "classification", 64, 2)
    assert d.dropped == 3 and len(d.train) + len(d.eval) == 10
    with pytest.raises(DataError, match=r"every one of the 2 rows has an empty 'text'"):
        load_task_data(tok, str(_lines(tmp_path / "z.csv", ["text,label", ",0", ",1"])), "classification", 64, 0)  # fmt: skip


# -- through the CLI: one line, exit 2 --------------------------------------------------------


def test_cli_prints_data_errors_on_one_line(tmp_path, capsys):
    from peftlab.cli import main

    tiny = save_tiny_lm(tmp_path / "lm")
    capsys.readouterr()  # saving prints progress bars
    bad_chat = _lines(tmp_path / "c.jsonl", [_chat(USER, {"role": "assistant", "content": None})])
    dup = _lines(tmp_path / "d.csv", ["text,label,label", "a,0,1", "b,1,1"])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny), "max_steps": 1, "progress": False}))
    for data, expected in [
        (bad_chat, "c.jsonl: line 1: messages[1] (role 'assistant'): content must be a string"),
        (dup, "d.csv: the header names column(s) ['label'] more than once"),
    ]:
        # a fresh output_dir each time: a refused run leaves config.yaml behind (loop.py)
        code = main(["train", str(cfg), f"data={data}", f"output_dir={tmp_path / data.stem}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("peftlab train: error: ") and expected in err
        assert err.count("\n") == 1 and "Traceback" not in err
    code = main(["train", str(cfg), "data_size=0", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("peftlab train: error: data_size=0 is invalid")
