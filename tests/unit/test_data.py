"""Data: readers, built-in tasks, response-only labels, truncation, collation, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from peftlab.data import (
    IGNORE,
    TASKS,
    DataError,
    collate,
    encode_messages,
    generate,
    load_task_data,
    read_classification,
    read_generation,
)
from tests.tiny_lm import char_tokenizer

ROOT = Path(__file__).resolve().parents[2]
# The shared data folder sits next to the checkout (or next to the folder of worktrees).
SHARED = next(
    (p / "shared" / "data" for p in ROOT.parents[:2] if (p / "shared" / "data").is_dir()),
    ROOT.parent / "shared" / "data",
)
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def tok():
    return char_tokenizer()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _response_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_builtin_tasks_are_seeded_and_correct():
    for task in TASKS:
        a, b = generate(task, 50, seed=1), generate(task, 50, seed=1)
        assert a == b and a != generate(task, 50, seed=2)
    for r in generate("sort", 50, 0):
        nums = [int(x) for x in r["messages"][0]["content"].split(":")[1].split()]
        assert r["messages"][1]["content"] == " ".join(map(str, sorted(nums)))
    for r in generate("arith", 50, 0):
        a, op, b = r["messages"][0]["content"].split(":")[1].split()
        assert int(r["messages"][1]["content"]) == (
            int(a) + int(b) if op == "+" else int(a) - int(b)
        )


def test_labels_cover_only_the_response_plain_and_chat_template(tok):
    msgs = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
    ids, labels, prompt = encode_messages(tok, msgs)
    assert _response_text(tok, ids, labels) == "b a</s>\n\n"  # plain layout, eos learned
    assert ids[: len(prompt)] == prompt and all(x == IGNORE for x in labels[: len(prompt)])
    assert tok.decode(prompt).endswith("### Response:\n")

    tok.chat_template = TEMPLATE
    multi = [
        msgs[0],
        msgs[1],
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, labels, prompt = encode_messages(tok, multi)
    # Both assistant turns are learned; user turns and role headers are not.
    assert _response_text(tok, ids, labels) == "b a</s>ok</s>"
    assert tok.decode(prompt).endswith("<user>again</s><assistant>")


def test_alpaca_json_jsonl_and_chat_jsonl(tmp_path):
    rec = {"instruction": "Add", "input": "1 2", "output": "3"}
    (tmp_path / "a.json").write_text(json.dumps([rec, {**rec, "input": ""}]))
    out = read_generation(tmp_path / "a.json")
    assert (
        out[0]["messages"][0]["content"] == "Add\n\n1 2"
        and out[1]["messages"][0]["content"] == "Add"
    )
    assert read_generation(_write(tmp_path / "a.jsonl", [json.dumps(rec)] * 3))[2] == out[0]
    chat = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert read_generation(_write(tmp_path / "c.jsonl", [json.dumps(chat)]))[0] == chat


def test_split_truncation_and_collation(tok):
    d = load_task_data(
        tok, "builtin:sort", "causal-lm", max_length=62, eval_size=10, data_size=30, seed=0
    )
    assert (
        len(d.train) + d.dropped == 30
        and d.dropped > 0
        and len(d.eval) <= 10
        and len(d.eval_prompts) == len(d.eval)
    )
    full = load_task_data(
        tok, "builtin:sort", "causal-lm", max_length=1000, eval_size=10, data_size=30, seed=0
    )
    longer = sum(len(e["input_ids"]) > 62 for e in full.train + full.eval)
    assert d.truncated == longer > 0  # every cut example is counted
    assert all(len(e["input_ids"]) <= 62 for e in d.train)
    train_prompts = {tuple(e["input_ids"]) for e in full.train}
    assert not any(tuple(e["input_ids"]) in train_prompts for e in full.eval)  # disjoint split
    batch = collate(full.train[:3], tok.pad_token_id)
    width = max(len(e["input_ids"]) for e in full.train[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert torch.equal(
        batch["attention_mask"].sum(1), torch.tensor([len(e["input_ids"]) for e in full.train[:3]])
    )
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_classification_csv(tmp_path, tok):
    rows = ["review,stars"] + [f"text number {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    path = _write(tmp_path / "d.csv", rows)
    d = load_task_data(
        tok, str(path), "classification", 8, eval_size=4, text_column="review", label_column="stars"
    )
    assert d.label_names == ["neg", "pos"] and len(d.train) == 16 and len(d.eval) == 4
    assert d.truncated == 20 and all(len(e["input_ids"]) == 8 for e in d.train)
    assert collate(d.train[:2], 0)["labels"].shape == (2,)


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        (
            "bad.jsonl",
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '],
            r"bad\.jsonl: line 2: malformed JSON",
        ),
        (
            "missing.jsonl",
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'],
            r"missing\.jsonl: line 2: missing field 'output'",
        ),
        ("empty.jsonl", [""], r"empty\.jsonl holds no examples"),
        (
            "chat.jsonl",
            ['{"messages": [{"role": "user", "content": "hi"}]}'],
            r"chat\.jsonl: line 1: the last message",
        ),
        (
            "arr.json",
            ['[{"instruction": "a", "output": "b"}, {"output": "b"}]'],
            r"arr\.json: record 1: missing field 'instruction'",
        ),
    ],
)
def test_bad_generation_files(tmp_path, name, content, pattern):
    with pytest.raises(DataError, match=pattern):
        read_generation(_write(tmp_path / name, content))


def test_bad_classification_and_specs(tmp_path, tok):
    path = _write(tmp_path / "d.tsv", ["sentence\tlabel", "fine\t1"])
    with pytest.raises(
        DataError,
        match=r"d\.tsv: no column 'target' \(set by label_column\); the header has columns \['sentence', 'label'\]",
    ):
        read_classification(path, "sentence", "target")
    with pytest.raises(DataError, match=r"d\.tsv holds no examples"):
        read_classification(_write(tmp_path / "d.tsv", ["sentence\tlabel"]), "sentence", "label")
    with pytest.raises(
        DataError, match="builtin:nope is not a built-in task; built-in tasks: builtin:sort"
    ):
        load_task_data(tok, "builtin:nope", "causal-lm", 64)
    with pytest.raises(
        DataError, match="is causal-lm data but the model is a classification model"
    ):
        load_task_data(tok, "builtin:sort", "classification", 64)
    with pytest.raises(
        DataError, match=re.escape("no training examples left after holding out eval_size=64")
    ):
        load_task_data(
            tok,
            str(_write(tmp_path / "s.jsonl", ['{"instruction": "a", "output": "b"}'])),
            "causal-lm",
            64,
        )
    with pytest.raises(DataError, match="does not exist"):
        read_generation(tmp_path / "nope.json")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")
def test_real_files_alpaca_and_sst2():
    alpaca = read_generation(SHARED / "alpaca" / "alpaca_data.json")
    assert len(alpaca) == 52002 and alpaca[0]["messages"][1]["role"] == "assistant"
    sst2 = read_classification(SHARED / "sst2" / "dev.tsv", "sentence", "label")
    assert len(sst2) == 872 and {r["label"] for r in sst2} == {"0", "1"}


def test_sentence_pairs_carry_the_tokenizers_token_types_into_the_batch():
    """A pair's second text is segment 1 for BERT-style models (as ``tokenizer(a, b)`` gives
    it), also when truncation cut the pair; single texts and padding are segment 0."""
    import torch

    from peftlab.data.encode import classification_fn, collate
    from peftlab.models import ModelLoadError, load_tokenizer

    try:
        tok = load_tokenizer("minilm-l6")
    except ModelLoadError as e:
        pytest.skip(f"bundled MiniLM unavailable: {e}")
    fn = classification_fn(tok, 16, {"0": 0, "1": 1})
    texts = ["the cat sat", "a much longer first sentence that will be cut", "alone"]
    pairs = ["on the mat", "and its short pair", None]
    enc = fn({"text": texts, "text_pair": pairs, "label": ["0", "1", "0"]})
    examples = [{k: enc[k][i] for k in ("input_ids", "label", "type_start")} for i in range(3)]
    batch = collate(examples, tok.pad_token_id)
    want = tok(texts[:2], pairs[:2], truncation="longest_first", max_length=16, padding=True)
    width = batch["input_ids"].shape[1]
    for row in range(2):
        types = want["token_type_ids"][row] + [0] * (width - len(want["token_type_ids"][row]))
        assert batch["token_type_ids"][row].tolist() == types and 1 in types
    assert batch["token_type_ids"][2].sum() == 0  # a single text: segment 0 throughout
    assert len(examples[1]["input_ids"]) == 16  # the long pair was cut, and still typed
    single = collate([examples[2]], tok.pad_token_id)
    assert "token_type_ids" not in single and torch.equal(single["labels"], torch.tensor([0]))
