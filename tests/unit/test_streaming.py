"""Streaming (issue #16): training files read as a stream, never whole; buffer-shuffled per
epoch; the held-out head; mixtures; resume bit-exact by skipping what was read; only
O(shuffle_buffer) records pulled before the first step; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.core.config import ConfigError
from peftlab.data import DataError, StreamedTrain, load_streamed, load_task_data
from peftlab.data import stream as streaming
from peftlab.train import TrainConfig, checkpoint, train
from tests.tiny_lm import char_tokenizer, save_tiny_lm
from tests.unit.test_rundir import _crashed_run, _same_adapter


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm"))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _alpaca(path: Path, n: int, start: int = 0) -> Path:
    rows = [{"instruction": f"sort {i}", "output": f"{i % 7} {i}"} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _texts(tok, examples: list[dict]) -> list[str]:
    return [tok.decode(e["input_ids"]) for e in examples]


def _cfg(tiny_dir, out, data, **kw):
    base = dict(
        model=tiny_dir,
        method="lora",
        method_args={"r": 4, "target_modules": "all-linear"},
        data=str(data),
        data_size=None,
        streaming=True,
        shuffle_buffer=8,
        eval_size=4,
        max_steps=12,
        batch_size=4,
        max_length=64,
        lr=1e-2,
        save_every=2,
        eval_exact_match=False,
        progress=False,
        output_dir=str(out),
    )
    return {**base, **kw}


# ---- the config --------------------------------------------------------------------------------


def test_streaming_refusals_are_one_line_naming_the_key(tmp_path):
    data = str(_alpaca(tmp_path / "d.jsonl", 10))
    with pytest.raises(ConfigError) as e:
        TrainConfig(data=data, streaming=True)
    assert str(e.value).startswith("streaming=True is invalid: streaming must be false without ")
    assert "set max_steps=N" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="streaming=True is invalid: .*without max_steps"):
        TrainConfig(data=data, streaming=True, epochs=2.0)
    with pytest.raises(ConfigError, match="packing=True is invalid: .*with streaming"):
        TrainConfig(data=data, streaming=True, packing=True, max_steps=5)
    with pytest.raises(ConfigError, match=r"streaming=True is invalid: .*\['builtin:sort'\]"):
        TrainConfig(streaming=True, max_steps=5)
    with pytest.raises(ConfigError, match="shuffle_buffer=0 is invalid"):
        TrainConfig(data=data, streaming=True, max_steps=5, shuffle_buffer=0)
    assert TrainConfig(data=data, streaming=True, max_steps=5).shuffle_buffer == 10_000


# ---- order, epochs, the held-out head, the position record -------------------------------------


def test_a_stream_is_buffer_shuffled_per_epoch_and_resumes_from_its_record(tmp_path, tok):
    path = _alpaca(tmp_path / "d.jsonl", 30)
    load = lambda: load_streamed(tok, str(path), "causal-lm", 64, shuffle_buffer=8, eval_size=4)  # noqa: E731
    data = load()
    assert isinstance(data.train, StreamedTrain)
    whole = load_task_data(tok, str(path), "causal-lm", 64, eval_size=0)
    by_text = sorted(_texts(tok, whole.train))
    head = [t for t in by_text if any(f"sort {i}\n" in t for i in range(4))]
    assert sorted(_texts(tok, data.validation)) == head  # the file's first 4 records
    state: dict = {}
    batches = [_texts(tok, data.train.micro_batch(m, 4, state)) for m in range(14)]
    epoch0, epoch1 = sum(batches[:6], []), sum(batches[6:12], [])
    # 26 training records: 6 micro-batches of 4 per epoch, the last 2 records dropped
    assert len(set(epoch0)) == len(set(epoch1)) == 24
    assert set(epoch0) <= set(by_text) - set(head) and set(epoch1) <= set(by_text) - set(head)
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0, key=by_text.index)  # reshuffled
    assert len(data.train) == 26 and data.counts["train"]["kept"] == 26
    assert data.sources[str(path)]["read_through"] and data.train.epoch == 2.3333
    assert state["stream"]["micro_batch"] == 14 and state["stream"]["epoch"] == 2
    # the same data and seed: the same micro-batches; from a position record or by replaying
    record: dict = {}
    fresh = load().train
    assert [_texts(tok, fresh.micro_batch(m, 4, record)) for m in range(9)] == batches[:9]
    record = json.loads(json.dumps(record))  # as a checkpoint stores it
    assert [_texts(tok, load().train.micro_batch(m, 4, record)) for m in range(9, 14)] == batches[
        9:
    ]
    assert [_texts(tok, load().train.micro_batch(m, 4, {})) for m in range(9, 14)] == batches[9:]
    other = load_streamed(tok, str(path), "causal-lm", 64, shuffle_buffer=8, eval_size=4, seed=1)
    assert [_texts(tok, other.train.micro_batch(m, 4, {})) for m in range(6)] != batches[:6]


def test_data_size_caps_and_a_mixture_draws_by_weight(tmp_path, tok):
    a = _alpaca(tmp_path / "a.jsonl", 40)
    b = tmp_path / "b.jsonl"
    b.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(40))
    )
    capped = load_streamed(
        tok, str(a), "causal-lm", 64, shuffle_buffer=4, eval_size=2, data_size=10
    )
    got = sum((capped.train.micro_batch(m, 5, {}) for m in range(4)), [])
    assert len(set(map(tuple, (e["input_ids"] for e in got)))) == 10  # 2 epochs of the 10 records
    spec = [{"path": str(a), "weight": 3, "name": "a"}, {"path": str(b), "weight": 1, "name": "b"}]
    mix = load_streamed(tok, spec, "causal-lm", 64, shuffle_buffer=4, eval_size=4, data_size=24)
    assert [e["source"] for e in mix.validation] == ["a", "a", "a", "b"]
    state: dict = {}
    drawn = [e["source"] for m in range(8) for e in mix.train.micro_batch(m, 2, state)]
    assert drawn.count("a") > 2 * drawn.count("b") > 0
    assert mix.sources["a"]["train"] + mix.sources["b"]["train"] == len(mix.train)
    again = load_streamed(tok, spec, "causal-lm", 64, shuffle_buffer=4, eval_size=4, data_size=24)
    assert [e["source"] for m in range(8) for e in again.train.micro_batch(m, 2, {})] == drawn


def test_parquet_and_a_saved_dataset_stream_as_the_jsonl(tmp_path, tok):
    from datasets import Dataset

    path = _alpaca(tmp_path / "d.jsonl", 20)
    ds = Dataset.from_list([json.loads(ln) for ln in path.read_text().splitlines()])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    out = []
    for p in (path, tmp_path / "d.parquet", tmp_path / "saved"):
        data = load_streamed(tok, str(p), "causal-lm", 64, shuffle_buffer=4, eval_size=2)
        out.append([_texts(tok, data.train.micro_batch(m, 3, {})) for m in range(8)])
    assert out[0] == out[1] == out[2]


def test_classification_tsv_streams_with_labels_from_a_pass(tmp_path, tok):
    rows = [f'{i % 3}\t{i}\tsentence "{i}\tother {i}' for i in range(30)]
    path = tmp_path / "d.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + ("Quality\tid\ts1\ts2\n" + "\n".join(rows) + "\n").encode())
    columns = {"text": "s1", "text_pair": "s2", "label": "Quality"}
    data = load_streamed(
        tok, str(path), "classification", 64, shuffle_buffer=4, eval_size=2, columns=columns
    )
    assert data.label_names == ["0", "1", "2"]  # "2" first appears after the held-out head
    assert [e["label"] for e in data.validation] == [0, 1]
    assert 'sentence "0' in tok.decode(data.validation[0]["input_ids"])  # stray quote is text
    ex = data.train.micro_batch(0, 4, {})
    assert all(set(e) == {"input_ids", "label", "type_start", "length", "source"} for e in ex)
    path.write_text("Quality\ts1\n" + "".join(f"1\tt{i}\n" for i in range(5)))
    with pytest.raises(DataError, match="'Quality' holds the single value '1' in all 5 examples"):
        load_streamed(tok, str(path), "classification", 64, eval_size=1, columns={"text": "s1", "label": "Quality"})  # fmt: skip


def test_streamed_data_errors(tmp_path, tok):
    path = _alpaca(tmp_path / "d.jsonl", 12)
    with pytest.raises(
        DataError, match=r"no training examples left after holding out 12 .*eval_size"
    ):
        load_streamed(tok, str(path), "causal-lm", 64, eval_size=12)
    with pytest.raises(DataError, match=r"batch_size × processes = 16 exceeds the 10 training"):
        load_streamed(tok, str(path), "causal-lm", 64, eval_size=2).train.micro_batch(0, 16, {})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_streamed(tok, str(tmp_path / "empty.jsonl"), "causal-lm", 64)
    with pytest.raises(ConfigError, match="column_names is for headerless"):
        load_streamed(tok, str(path), "causal-lm", 64, column_names=["a", "b"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"instruction": "x", "output": \n')
    # found where the stream reaches it: here the reader's first block (the whole file)
    with pytest.raises(DataError, match=r"data='.*bad.jsonl': a record is not readable \(JSON"):
        data = load_streamed(tok, str(bad), "causal-lm", 64, eval_size=2, shuffle_buffer=2)
        for m in range(10):
            data.train.micro_batch(m, 2, {})


# ---- training --------------------------------------------------------------------------------


def test_streamed_resume_is_bit_exact(tiny_dir, tmp_path):
    """Crash in step 11 (checkpoints at 2, 4, ..., 10): step-10 lies in the second epoch (9
    micro-batches of 4 per epoch), so the resume re-creates epoch 1's stream from the record
    and skips what was read; the adapter equals an uninterrupted streamed run's, bit for bit."""
    data = _alpaca(tmp_path / "d.jsonl", 40)
    reference = train(_cfg(tiny_dir, tmp_path / "ref", data))
    assert reference["train_examples"] == 36 and reference["steps"] == 12
    out = _crashed_run(tiny_dir, tmp_path / "run", at=11, **_cfg(tiny_dir, tmp_path / "run", data))
    assert checkpoint.latest(out).name == "step-0000010"
    saved = json.loads((checkpoint.latest(out) / "trainer_state.json").read_text())
    assert saved["stream"]["epoch"] == 1 and saved["stream"]["micro_batch"] == 10
    summary = train(str(out), resume=True)
    assert summary["resumed_from"] == "step-0000010" and summary["steps"] == 12
    assert _same_adapter(out / "adapter", tmp_path / "ref" / "adapter")
    assert summary["token_counts"] == reference["token_counts"]
    assert summary["sources"] == reference["sources"] and summary["train_examples"] == 36
    reshuffled = train(_cfg(tiny_dir, tmp_path / "b", data, shuffle_buffer=16, save_every=0))
    assert not _same_adapter(tmp_path / "b" / "adapter", tmp_path / "ref" / "adapter")
    assert reshuffled["steps"] == 12


class _Pulled:
    """Counts the records read out of the file (before the shuffle buffer), per step."""

    def __init__(self):
        self.n, self.at_step = 0, []

    def on_train_start(self, model):
        pass

    def on_step_end(self, record):
        self.at_step.append(self.n)

    def on_train_end(self, model):
        pass


def test_a_large_file_trains_while_only_the_buffer_is_read(tiny_dir, tmp_path, monkeypatch):
    """3,000 records, a buffer of 32: before the first step ends only the held-out head, the
    buffer and a micro-batch have been read out of the file, and three steps later hardly more
    (a reader that loaded the file would have pulled all 3,000)."""
    data = _alpaca(tmp_path / "big.jsonl", 3000)
    pulled = _Pulled()
    opened = []
    original = streaming.open_stream

    def counting(source):
        ds = original(source)
        opened.append(ds)

        def count(r):
            pulled.n += 1
            return r

        return ds.map(count)

    monkeypatch.setattr(streaming, "open_stream", counting)
    cfg = _cfg(tiny_dir, tmp_path / "run", data, shuffle_buffer=32, max_steps=4, save_every=0)
    summary = train(cfg, callbacks=[pulled])
    from datasets import IterableDataset

    assert len(opened) == 1 and isinstance(opened[0], IterableDataset)
    # the held-out head (4 + 1 looked at), read again to skip it, then the buffer and the
    # micro-batches; datasets pulls records into the buffer in chunks of 16
    head, buffer, chunk = 5 + 4, 32, 16
    assert head + buffer <= pulled.at_step[0] <= head + buffer + chunk
    assert pulled.at_step[-1] <= head + buffer + 4 * 4 + chunk
    assert summary["train_examples"] == 16 and not summary["sources"][str(data)]["read_through"]
