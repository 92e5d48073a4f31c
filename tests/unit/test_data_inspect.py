"""`peftlab data inspect`: counts, length percentiles and one example with its loss marked."""

from __future__ import annotations

import json

import pytest
import yaml

from peftlab.cli import main
from peftlab.data.inspect import inspect_data, percentile
from tests.tiny_lm import char_tokenizer, save_tiny_lm


def test_percentile_is_nearest_rank():
    values = [5, 1, 4, 2, 3]
    assert [percentile(values, q) for q in (20, 50, 90, 100)] == [1, 3, 5, 5]
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([], 50) is None


def test_report_counts_lengths_and_marks_the_response(tmp_path):
    tok = char_tokenizer()
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    rows += [{"question": "x" * 70, "answer": "lost"}]  # cut before its answer: dropped
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = inspect_data(tok, str(path), "causal-lm", 60, eval_size=2, seed=1)
    train = report["splits"]["train"]
    assert train["read"] == 9 and train["kept"] + train["dropped"] == 9
    assert report["splits"]["validation"]["read"] == 2
    cut = sum(s["truncated"] for s in report["splits"].values())
    assert cut == 1 and sum(s["dropped"] for s in report["splits"].values()) == 1
    # percentiles of the lengths before truncation, over the examples read
    short = len(tok("### Instruction:\nq0\n\n### Response:\na0</s>\n\n")["input_ids"])
    assert train["lengths"]["p50"] == short and train["lengths"]["p100"] >= short
    ex = report["example"]
    answer = next(r["answer"] for r in rows if f"\n{r['question']}\n" in ex["text"])
    assert ex["text"].endswith(f"### Response:\n«{answer}</s>\n\n»")
    assert ex["loss_tokens"] == len(answer) + len("</s>\n\n") - 3  # "</s>" is one token


def test_cli_data_inspect_prints_the_report(tmp_path, capsys):
    tiny = save_tiny_lm(tmp_path / "lm")
    rows = ["label,text"] + [f"{i % 2},sentence {i}" for i in range(12)] + ["1,"]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": str(tiny), "data": str(tmp_path / "d.csv"), "eval_size": 2})
    )
    capsys.readouterr()
    # a causal LM learns a classification file through columns {text, label}
    assert main(["data", "inspect", str(cfg), "columns={text: text, label: label}"]) == 0
    out = capsys.readouterr().out
    assert "causal-lm data, max_length=256" in out and "labels: 0, 1" in out
    assert "empty texts dropped before the split: 1" in out
    assert "### Response:\n«" in out and "train 10, validation 2, test 0, empty 1" in out
    assert main(["data", "inspect", str(cfg), "columns.prompt=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab data: error: ") and err.count("\n") == 1
    assert "d.csv: no column 'nope' (set by columns.prompt); the header has columns" in err
    assert main(["data", "inspect", "--json", str(cfg), "columns={text: text, label: label}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["read"] == 10 and report["label_names"] == ["0", "1"]


def test_a_streaming_config_is_inspected_from_the_head_of_its_stream(tmp_path, capsys):
    """streaming: true — the held-out splits whole, the training split from its first
    --sample examples in the order the run reads them, never the whole file."""
    tok = char_tokenizer()
    rows = [{"instruction": f"say {i}", "output": f"{i}" * (1 + i % 5)} for i in range(400)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(eval_size=4, seed=0, streaming=True, shuffle_buffer=16)
    head = inspect_data(tok, str(path), "causal-lm", 64, sample=10, **kw)
    train = head["splits"]["train"]
    assert head["sampled"] == {"examples": 10, "complete": False}
    assert train["kept"] == 10 and train["read"] == 10 and head["splits"]["validation"]["read"] == 4
    assert list(head["sources"].values())[0]["train"] == 10 and train["lengths"]["p100"] is not None
    whole = inspect_data(tok, str(path), "causal-lm", 64, sample=1000, **kw)
    assert whole["sampled"] == {"examples": 396, "complete": True}
    unstreamed = inspect_data(tok, str(path), "causal-lm", 64, eval_size=4, seed=0)
    assert whole["splits"]["train"]["kept"] == unstreamed["splits"]["train"]["kept"] == 396
    assert whole["splits"]["train"]["lengths"] == unstreamed["splits"]["train"]["lengths"]
    assert head["example"]["text"].count("«") == 1
    # the command line: a streaming config, --sample, and a bad --sample in one line
    tiny = save_tiny_lm(tmp_path / "lm")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny), "data": str(path), "eval_size": 4,
                                   "streaming": True, "max_steps": 5}))  # fmt: skip
    capsys.readouterr()
    assert main(["data", "inspect", str(cfg), "--sample", "25"]) == 0
    assert "first 25 examples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(cfg), "--sample", "0"])
    assert "is not a whole number ≥ 1" in capsys.readouterr().err
