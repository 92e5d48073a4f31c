"""Data as users bring it: recognised formats, column mapping, sentence pairs, headerless
tables, parquet / arrow / save_to_disk / globs through `datasets`, mixtures, the
tokenization cache, and the bad input each of these can meet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.core.config import ConfigError
from peftlab.data import DataError, encode, load_task_data, read_generation
from peftlab.data.load import apportion
from peftlab.train import TrainConfig, train
from tests.tiny_lm import char_tokenizer

QA = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "id": i} for i in range(24)]
SHAREGPT = [
    {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": f"Reverse: {w}"},
            {"from": "gpt", "value": w[::-1]},
        ],
    }
    for w in ["abc", "hello", "peft", "lora", "data", "tokens", "mix", "pairs"] * 2
]


@pytest.fixture
def tok():
    return char_tokenizer()


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _load(tok, data, kind="causal-lm", max_length=128, **kw):
    kw.setdefault("eval_size", 4)
    return load_task_data(tok, data, kind, max_length, **kw)


def _ids(d) -> dict:
    return {s: [e["input_ids"] for e in getattr(d, s)] for s in ("train", "validation", "test")}


# -- formats recognised without a mapping -------------------------------------------------------


def test_recognised_formats_become_messages(tmp_path):
    user, bot = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    cases = {
        "qa": ({"question": "q", "answer": "a"}, [user, bot]),
        "pc": ({"prompt": "q", "completion": "a"}, [user, bot]),
        "pc_chat": ({"prompt": [user], "completion": [bot]}, [user, bot]),
        "alpaca": ({"instruction": "q", "output": "a"}, [user, bot]),
        "chat": ({"messages": [user, bot]}, [user, bot]),
        "sharegpt": (
            {
                "system": "s",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },  # fmt: skip
            [{"role": "system", "content": "s"}, user, bot],
        ),
    }
    for name, (record, messages) in cases.items():
        assert read_generation(_jsonl(tmp_path / f"{name}.jsonl", [record])) == [
            {"messages": messages}
        ], name
    with pytest.raises(DataError) as e:
        read_generation(_jsonl(tmp_path / "x.jsonl", [{"query": "q", "reply": "a"}]))
    msg = str(e.value)
    assert "x.jsonl: line 1: the record's keys ['query', 'reply'] match no known format" in msg
    assert "columns: {prompt: <column>, response: <column>}" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "turn,expected",
    [
        (
            {"from": "bot", "value": "x"},
            "conversations[1].from='bot' is invalid: from must be one of ('system', 'human', 'gpt')",
        ),  # fmt: skip
        (
            {"from": "gpt", "value": None},
            "conversations[1] (from 'gpt'): value must be a string, got null",
        ),  # fmt: skip
        ({"from": "gpt"}, "conversations[1] has no 'value'; each turn is a {from, value} object"),
        ({"from": "human", "value": "again"}, "the last turn must have from 'gpt'"),
    ],
)
def test_bad_sharegpt_turns_name_the_line_and_turn(tmp_path, turn, expected):
    bad = {"conversations": [{"from": "human", "value": "q"}, turn]}
    with pytest.raises(DataError) as e:
        read_generation(_jsonl(tmp_path / "s.jsonl", [SHAREGPT[0], bad]))
    assert f"s.jsonl: line 2: {expected}" in str(e.value)


def test_mapped_prompt_response_system_and_history(tmp_path, tok):
    rec = {"q": "third", "a": "3", "sys": "count", "past": [["first", "1"], ["second", "2"]]}
    path = _jsonl(tmp_path / "m.jsonl", [rec] * 8)
    cols = {"prompt": "q", "response": "a", "system": "sys", "history": "past"}
    assert read_generation(path, cols)[0]["messages"] == [
        {"role": "system", "content": "count"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "3"},
    ]
    with pytest.raises(DataError, match=r"line 1: 'past' \(history\) must be a list"):
        read_generation(_jsonl(tmp_path / "h.jsonl", [{**rec, "past": "x"}]), cols)
    with pytest.raises(ConfigError, match="generation needs prompt and response"):
        read_generation(path, {"prompt": "q"})


# -- the acceptance cases: train without conversion --------------------------------------------


@pytest.mark.parametrize("name,records", [("qa", QA), ("sharegpt", SHAREGPT)])
def test_question_answer_and_sharegpt_files_train_as_they_are(tmp_path, tiny_dir, name, records):
    data = _jsonl(tmp_path / f"{name}.jsonl", records)
    summary = train(
        {
            "model": tiny_dir,
            "method_args": {"r": 4, "target_modules": "all-linear"},
            "data": data,
            "eval_size": 4,
            "test_size": 2,
            "max_steps": 2,
            "batch_size": 4,
            "progress": False,
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert summary["steps"] == 2 and summary["loss_tokens"] > 0
    assert summary["train_examples"] == len(records) - 6 and summary["test"]["test_loss"] > 0
    assert summary["sources"][data]["train"] == len(records) - 6


# -- parquet, arrow, save_to_disk and globs read the same records ----------------------------


def test_parquet_arrow_save_to_disk_and_globs_read_what_the_jsonl_holds(tmp_path, tok):
    import datasets

    src = _jsonl(tmp_path / "qa.jsonl", QA)
    ds = datasets.Dataset.from_list(QA)
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "dev": ds.select(range(6))}).save_to_disk(
        str(tmp_path / "dict")
    )
    half = len(QA) // 2
    for i, part in enumerate((QA[:half], QA[half:])):
        _jsonl(tmp_path / f"shard-{i}.jsonl", part)
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / f"shard-{i}.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    expected = _ids(_load(tok, src, test_size=3, seed=5))
    for spec in (
        tmp_path / "qa.parquet",
        tmp_path / "saved",
        arrow,
        tmp_path / "shard-*.jsonl",
        tmp_path / "shard-*.parquet",
    ):
        assert _ids(_load(tok, str(spec), test_size=3, seed=5)) == expected, spec
    d = _load(tok, {"path": str(tmp_path / "dict"), "split": "dev"}, eval_size=1)
    assert len(d.train) + len(d.validation) == 6
    with pytest.raises(DataError, match=r"holds the splits \['dev', 'train'\], not 'test'"):
        _load(tok, {"path": str(tmp_path / "dict"), "split": "test"})
    with pytest.raises(DataError, match=r"matches no files"):
        _load(tok, str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is a directory but not one written by Dataset.save_to_disk"):  # fmt: skip
        _load(tok, str(tmp_path / "plain"))


def test_class_label_names_come_from_the_dataset(tmp_path, tok):
    import datasets

    rows = [{"sentence": f"text {i}", "y": i % 3} for i in range(12)]
    names = datasets.ClassLabel(names=["neg", "neutral", "pos"])
    datasets.Dataset.from_list(rows).cast_column("y", names).save_to_disk(str(tmp_path / "s"))
    d = _load(tok, str(tmp_path / "s"), "classification", 32, columns={"text": "sentence", "label": "y"})  # fmt: skip
    assert d.label_names == ["neg", "neutral", "pos"]
    assert [d.label_names[e["label"]] for e in d.train + d.validation].count("pos") == 4


# -- bad input: clear errors or counted drops ----------------------------------------------------


def test_a_mapped_column_that_does_not_exist_lists_the_columns(tmp_path, tok):
    import datasets

    src = _jsonl(tmp_path / "qa.jsonl", QA)
    datasets.Dataset.from_list(QA).to_parquet(str(tmp_path / "qa.parquet"))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Quality\t#1 String\t#2 String\n" + "1\ta\tb\n0\tc\td\n" * 4)
    for spec, kind, cols, expected in [
        (
            src,
            "causal-lm",
            {"prompt": "questoin", "response": "answer"},
            "qa.jsonl: no column 'questoin' (set by columns.prompt); its columns are ['question', 'answer', 'id'] (did you mean 'question'?)",
        ),  # fmt: skip
        (
            str(tmp_path / "qa.parquet"),
            "causal-lm",
            {"prompt": "q", "response": "answer"},
            "qa.parquet: no column 'q' (set by columns.prompt); its columns are ['question', 'answer', 'id']",
        ),  # fmt: skip
        (
            str(tsv),
            "classification",
            {"text": "#1 String", "text_pair": "#2 string", "label": "Quality"},  # fmt: skip
            "p.tsv: no column '#2 string' (set by columns.text_pair); the header has columns ['Quality', '#1 String', '#2 String'] (did you mean '#2 String'?)",
        ),  # fmt: skip
    ]:
        with pytest.raises(DataError) as e:
            _load(tok, spec, kind, columns=cols, eval_size=1)
        assert expected in str(e.value) and "\n" not in str(e.value)


def test_one_class_and_empty_files_are_refused(tmp_path, tok):
    one = tmp_path / "one.tsv"
    one.write_text("Quality\ts\n" + "1\tsame class\n" * 6)
    with pytest.raises(DataError, match=r"columns\.label='Quality' holds the single value '1' in all 6 examples"):  # fmt: skip
        _load(tok, str(one), "classification", columns={"text": "s", "label": "Quality"}, eval_size=1)  # fmt: skip
    for name in ("e.jsonl", "e.csv", "e.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"e\.{name[2:]} (holds no examples|is empty)"):
            _load(tok, str(tmp_path / name), "classification" if name.endswith("csv") else "causal-lm")  # fmt: skip
    import datasets

    datasets.Dataset.from_dict({"question": [], "answer": []}).to_parquet(str(tmp_path / "e.parquet"))  # fmt: skip
    with pytest.raises(DataError, match=r"e\.parquet holds no examples"):
        _load(tok, str(tmp_path / "e.parquet"))


def test_a_response_emptied_by_truncation_is_a_counted_drop(tmp_path, tok):
    long = [{"question": "x" * 80, "answer": "yes"}] * 3
    data = _jsonl(tmp_path / "t.jsonl", QA[:10] + long)
    d = _load(tok, data, max_length=60, eval_size=0)
    assert len(d.train) == 10 and d.dropped == 3
    assert d.counts["train"] == {"read": 13, "truncated": 3, "dropped": 3, "kept": 10}
    assert sorted(d.lengths["train"])[-1] > 80  # lengths are before truncation
    with pytest.raises(DataError, match="every training example lost its response to truncation at max_length=20"):  # fmt: skip
        _load(tok, _jsonl(tmp_path / "l.jsonl", long), max_length=20, eval_size=0)


# -- headerless tables, sentence pairs ----------------------------------------------------------


def test_headerless_tsv_with_column_names(tmp_path, tok):
    path = tmp_path / "cola.tsv"
    path.write_text("".join(f"gj04\t{i % 2}\t*\tsentence {i}\n" for i in range(10)))
    names = ["source", "label", "mark", "sentence"]
    d = _load(tok, str(path), "classification", columns={"text": "sentence"}, column_names=names)
    assert d.label_names == ["0", "1"] and len(d.train) + len(d.validation) == 10
    assert sorted(tok.decode(e["input_ids"]) for e in d.train + d.validation)[0] == "sentence 0"
    with pytest.raises(DataError, match=r"cola\.tsv: no column 'text' \(set by text_column\); the header has columns \['source'"):  # fmt: skip
        _load(tok, str(path), "classification", column_names=names)
    with pytest.raises(DataError, match=r"line 1: 4 field\(s\) but the column_names has 3"):
        _load(tok, str(path), "classification", column_names=names[:3])
    with pytest.raises(ConfigError, match="column_names is for headerless .csv/.tsv files"):
        _load(tok, _jsonl(tmp_path / "q.jsonl", QA), column_names=names)
    with pytest.raises(ConfigError, match="a list of distinct names"):
        TrainConfig(column_names=["a", "a"])


def test_pairs_encoder_native_and_joined_for_causal_models(tmp_path, tok):
    from peftlab.models import load_tokenizer

    path = tmp_path / "pairs.tsv"
    rows = [f"{i % 2}\tfirst sentence number {i} is here\tsecond one {i}" for i in range(12)]
    path.write_text("Quality\t#1 String\t#2 String\n" + "\n".join(rows) + "\n")
    cols = {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}
    bert = load_tokenizer("minilm-l6")
    d = _load(bert, str(path), "classification", 64, columns=cols, eval_size=2)
    ids = d.train[0]["input_ids"]
    assert ids.count(bert.sep_token_id) == 2 and d.label_names == ["0", "1"]
    assert all(len(e["input_ids"]) == 12 for e in d.train)  # [CLS] 6 [SEP] 3 [SEP]
    cut = _load(bert, str(path), "classification", 10, columns=cols, eval_size=2)
    for e in cut.train:  # the longer text is cut first, both separators stay
        assert len(e["input_ids"]) == 10 and e["input_ids"].count(bert.sep_token_id) == 2
    assert cut.truncated == 12
    sep = cut.train[0]["input_ids"].index(bert.sep_token_id)
    assert sep == 5 and cut.train[0]["input_ids"][sep + 1 :] == d.train[0]["input_ids"][-4:]
    # a tokenizer without a separator (a decoder's) reads the pair through a template
    joined = _load(tok, str(path), "classification", 200, columns=cols, eval_size=2)
    assert tok.decode(joined.train[0]["input_ids"]).startswith("Text 1: first sentence number")
    # a causal LM learns the label as the response; the label names are reported
    gen = _load(tok, str(path), "causal-lm", 200, columns=cols, eval_size=2)
    assert gen.label_names == ["0", "1"] and gen.validation[0]["answer"] in ("0", "1")
    assert "Text 2: second one" in tok.decode(gen.train[0]["input_ids"])


# -- mixtures --------------------------------------------------------------------------------


def test_mixture_weights_sources_and_repeats(tmp_path, tok):
    qa = _jsonl(tmp_path / "qa.jsonl", QA)  # 24 examples
    mix = [{"path": qa, "weight": 0.75, "name": "qa"}, {"path": "builtin:sort", "weight": 0.25}]
    d = _load(tok, mix, eval_size=4, data_size=40)
    by_source = [e["source"] for e in d.train]
    assert by_source.count("qa") == 30 and by_source.count("builtin:sort") == 10
    assert {e["source"] for e in d.validation} == {"qa", "builtin:sort"}
    assert d.sources["qa"] == {"weight": 0.75, "train": 30, "validation": 3, "test": 0, "unique_train": 21, "empty": 0}  # fmt: skip
    # no data_size: as many as the file allows without repeating: 21 / 0.75 = 28 in all
    d = _load(tok, mix, eval_size=4)
    assert len(d.train) == 28 and d.sources["qa"]["train"] == 21
    assert apportion(10, [0.5, 0.3, 0.2]) == [5, 3, 2] and apportion(3, [0.5, 0.5]) == [2, 1]
    with pytest.raises(ConfigError, match=r"data\[1\]\.weight=0 is invalid"):
        TrainConfig(data=[qa, {"path": qa, "weight": 0}])
    with pytest.raises(ConfigError, match=r"source name\(s\) \['qa'\] appear twice"):
        TrainConfig(data=[{"path": qa, "name": "qa"}, {"path": "builtin:sort", "name": "qa"}])
    with pytest.raises(ConfigError, match=r"data\[0\]: unknown key\(s\) \['wieght'\]"):
        TrainConfig(data=[{"path": qa, "wieght": 1}])


# -- tokenization cache ----------------------------------------------------------------------


def test_tokenization_cache_hits_and_misses(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(encode, "CACHE_MIN", 1)
    calls = {"n": 0}
    real = encode.encode_messages

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(encode, "encode_messages", counting)
    data = _jsonl(tmp_path / "qa.jsonl", QA)
    cached = tmp_path / "cache" / "tokenized"

    def load(t, max_length=128):
        calls["n"] = 0
        d = _load(t, data, max_length=max_length, test_size=2)
        return d, calls["n"]

    first, n = load(tok)
    assert n == len(QA) and len(list(cached.glob("*.arrow"))) == 1
    again, n = load(tok)
    assert n == 0 and _ids(again) == _ids(first)  # read from the cache
    monkeypatch.setattr(encode, "CACHE_MIN", 10**9)
    assert _ids(load(tok)[0]) == _ids(first)  # the cache holds what tokenizing gives
    monkeypatch.setattr(encode, "CACHE_MIN", 1)
    templated = char_tokenizer()
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    other = char_tokenizer()
    other.add_tokens(["<sep>"])  # another vocabulary
    for changed, ml in ((tok, 100), (templated, 128), (other, 128)):
        _, n = load(changed, ml)
        assert n == len(QA)  # max_length, the template, the tokenizer: each a miss
    assert load(char_tokenizer())[1] == 0  # an equal tokenizer loaded afresh: a hit
    assert len(list(cached.glob("*.arrow"))) == 4
