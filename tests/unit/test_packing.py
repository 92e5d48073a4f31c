"""Sequence packing (issue #16): rows by best-fit decreasing, a packed batch's loss and
gradients equal to its examples' unpacked ones, attention that never crosses examples, packed
resume bit-exact, the refusals (classification models, virtual-token methods, models that let
packed examples attend to each other), and the padding statistics in the summary."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.data import IGNORE, collate
from peftlab.data.packing import (
    checked_rows,
    collate_packed,
    model_inputs,
    pack_rows,
    real_tokens,
    separates_examples,
)
from peftlab.train import TrainConfig, checkpoint, train
from peftlab.train.evaluate import loss_sum
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama
from tests.tiny_lm import char_tokenizer
from tests.unit.test_rundir import _crashed_run, _same_adapter


def _examples(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[dict]:
    """Encoded causal-LM examples of random tokens: the first ~third of every other one is a
    prompt (-100); the rest carry a label on every token, the first one included."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        cut = 0 if i % 2 else n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]})
    return out


def _predicted(examples: list[dict]) -> int:
    """Labels an unpacked batch predicts: all but each example's first token's."""
    return sum(sum(y != IGNORE for y in e["labels"][1:]) for e in examples)


# ---- rows --------------------------------------------------------------------------------------


def test_rows_are_best_fit_decreasing():
    # 6 opens row 0 (room 4), 5 row 1 (room 5); 4 fits row 0 exactly; 3 then 2 fill row 1.
    assert pack_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    lengths = [random.Random(1).randint(1, 64) for _ in range(500)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))  # each example once
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 11 / 9 * sum(lengths) / 64 + 1  # BFD's bound against the volume bound
    assert pack_rows(lengths, 64) == rows  # deterministic
    with pytest.raises(ValueError, match="example 1 has 11 tokens; a row holds 1 to 10"):
        pack_rows([3, 11], 10)


def test_a_packed_batch_restarts_positions_and_masks_the_boundaries():
    a, b, c = _examples([3, 4, 5])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["token_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert batch["input_ids"][0].tolist() == a["input_ids"] + b["input_ids"]
    # each example's first label is -100: no example predicts another's first token
    assert batch["labels"][0].tolist() == [IGNORE] + a["labels"][1:] + [IGNORE] + b["labels"][1:]
    assert batch["labels"][1, 5:].tolist() == [IGNORE, IGNORE]
    assert real_tokens(batch) == 12
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert real_tokens(collate([a, c], pad_id=0)) == 8


# ---- (a) exact: loss and gradients -------------------------------------------------------------


def _loss_and_grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    total, count = loss_sum(model, batch, chunked)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), int(count), grads


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "plain"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_unpacked(chunked, attention):
    model = tiny_llama()
    model.set_attn_implementation(attention)
    model.train()  # as the trainer calls it (no dropout in the tiny Llama)
    examples = _examples([9, 5, 12, 3, 7, 6])
    rows = [[examples[i] for i in r] for r in pack_rows([9, 5, 12, 3, 7, 6], 16)]
    assert len(rows) == 3 and any(len(r) > 1 for r in rows)
    packed = _loss_and_grads(model, collate_packed(rows, pad_id=0), chunked)
    unpacked = _loss_and_grads(model, collate(examples, pad_id=0), chunked)
    assert packed[1] == unpacked[1] == _predicted(examples)
    torch.testing.assert_close(packed[0], unpacked[0], rtol=1e-5, atol=1e-5)
    assert packed[2].keys() == unpacked[2].keys() and len(packed[2]) > 0
    for name in packed[2]:
        torch.testing.assert_close(packed[2][name], unpacked[2][name], rtol=1e-5, atol=1e-5)


def test_one_packed_row_is_the_sum_of_its_examples_alone():
    model = tiny_llama()
    examples = _examples([6, 8, 4], seed=3)
    with torch.no_grad():
        packed, _ = loss_sum(model, collate_packed([examples], pad_id=0))
        alone = sum(loss_sum(model, collate([e], pad_id=0))[0] for e in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


# ---- (b) attention does not cross ------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_attention_never_crosses_examples(make):
    model = make()
    first, second = _examples([5, 6], seed=4)
    other = {**first, "input_ids": [(t * 7 + 1) % 128 for t in first["input_ids"]]}
    assert other["input_ids"] != first["input_ids"]
    with torch.no_grad():
        logits = [
            model(**model_inputs(collate_packed([[a, second]], pad_id=0))).logits[0, 5:]
            for a in (first, other)
        ]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        crossing = model(input_ids=torch.tensor([other["input_ids"] + second["input_ids"]]))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[0], alone, rtol=1e-5, atol=1e-5)  # positions restart too
    assert (crossing.logits[0, 5:] - logits[1]).abs().max() > 1e-3  # the unmasked row differs
    assert separates_examples(model)


class _Leaky(nn.Module):
    """A causal LM that ignores position ids: its packed examples attend to each other."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_llama()
        self.config = self.inner.config

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


class _OneRowOnly(nn.Module):
    """Keeps packed examples apart in a batch of one row only, as transformers' flash-attention
    path does; ``config._attn_implementation`` says which it claims to be."""

    def __init__(self, attention: str):
        super().__init__()
        self.inner = tiny_llama()
        self.config = SimpleNamespace(vocab_size=128, _attn_implementation=attention)

    def forward(self, input_ids, position_ids=None, use_cache=None):
        if input_ids.shape[0] > 1:
            position_ids = None  # the rows' examples see each other
        return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)


def test_flash_attention_runs_the_rows_as_one():
    rows = [[e] for e in _examples([5, 7])] + [_examples([4, 6], seed=1)]
    batch = collate_packed(rows, pad_id=0)
    assert not separates_examples(_OneRowOnly("sdpa"))  # a second row would be crossed
    flash = _OneRowOnly("flash_attention_2")
    assert separates_examples(flash)
    inputs = model_inputs(batch, flash)
    assert inputs["input_ids"].shape == (1, 3 * 10) and inputs["position_ids"].shape == (1, 30)
    with torch.no_grad():
        one_row = loss_sum(flash, batch, chunked=False)
        rows_apart = loss_sum(flash.inner, batch, chunked=False)
    assert int(one_row[1]) == int(rows_apart[1]) == _predicted([e for r in rows for e in r])
    torch.testing.assert_close(one_row[0], rows_apart[0], rtol=1e-5, atol=1e-5)


def test_a_model_that_lets_examples_attend_to_each_other_is_refused():
    assert not separates_examples(_Leaky())
    with pytest.raises(ConfigError) as e:
        checked_rows(_Leaky(), [3, 4], 8)
    msg = str(e.value)
    assert msg.startswith("packing=True is invalid: packing must be false for _Leaky")
    assert "attend to each other" in msg and "\n" not in msg


# ---- the trainer -------------------------------------------------------------------------------


def _cfg(tiny_dir, out, **kw):
    base = dict(
        model=tiny_dir,
        method="lora",
        method_args={"r": 4, "target_modules": "all-linear"},
        data="builtin:sort",
        data_size=64,
        eval_size=0,
        max_steps=8,  # 22 rows at batch 4: 5 micro-batches per epoch, so a second epoch too
        batch_size=4,
        max_length=256,
        lr=1e-2,
        save_every=2,
        packing=True,
        progress=False,
        output_dir=str(out),
    )
    return {**base, **kw}


def test_packed_resume_is_bit_exact(tiny_dir, tmp_path):
    """Crash in step 5 (checkpoints at 2 and 4), resume: the adapter equals, bit for bit, an
    uninterrupted packed run's; the run crossed an epoch, so the rows' reshuffle is covered."""
    reference = train(_cfg(tiny_dir, tmp_path / "ref"))
    assert reference["packed_rows"] == 22 and reference["steps"] == 8
    out = _crashed_run(tiny_dir, tmp_path / "run", at=5, **_cfg(tiny_dir, tmp_path / "run"))
    assert checkpoint.latest(out).name == "step-0000004"
    summary = train(str(out), resume=True)
    assert summary["resumed_from"] == "step-0000004" and summary["steps"] == 8
    assert _same_adapter(out / "adapter", tmp_path / "ref" / "adapter")
    assert summary["token_counts"] == reference["token_counts"]
    unpacked = train(_cfg(tiny_dir, tmp_path / "plain", packing=False, save_every=0))
    assert not _same_adapter(tmp_path / "plain" / "adapter", tmp_path / "ref" / "adapter")
    assert unpacked["packed_rows"] is None


class _Steps:
    def __init__(self):
        self.records = []

    def on_train_start(self, model):
        pass

    def on_step_end(self, record):
        self.records.append(record)

    def on_train_end(self, model):
        pass


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_padding_statistics(tiny_dir, tmp_path, packing):
    steps = _Steps()
    cfg = _cfg(tiny_dir, tmp_path / "run", packing=packing, max_steps=3, save_every=0)
    summary = train(cfg, callbacks=[steps])
    counts = summary["token_counts"]
    # one process, no accumulation: each step is one micro-batch of batch_size × its length
    slots = sum(4 * r.batch_length for r in steps.records)
    assert counts["real"] == summary["tokens"] == sum(r.tokens for r in steps.records)
    assert counts["real"] + counts["padded"] == slots and counts["padded"] > 0
    assert counts["padding_fraction"] == pytest.approx(counts["padded"] / slots)
    if packing:  # rows of several examples each, nearly full
        assert counts["real"] > 2 * 3 * 4 * 70 and counts["padding_fraction"] < 0.1


def test_packing_is_refused_for_classification_and_virtual_tokens(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t {i},{i % 2}\n" for i in range(20)))
    with pytest.raises(ConfigError) as e:
        train(
            {"model": "unused", "data": str(tmp_path / "d.csv"), "packing": True,
             "progress": False, "output_dir": str(tmp_path / "run")},
            model=tiny_bert(),
            tokenizer=char_tokenizer(),
        )  # fmt: skip
    msg = str(e.value)
    assert msg.startswith("packing=True is invalid: packing must be false for unused, a ")
    assert "classification model" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written
    for method in ("prefix", "prompt", "ptuning-v2"):
        with pytest.raises(ConfigError, match=rf"packing=True is invalid: .*'{method}'.*virtual"):
            TrainConfig(method=method, packing=True)
    assert TrainConfig(packing=True).packing is True


# ---- the benchmark ---------------------------------------------------------------------------


def test_the_benchmark_worker_and_report(monkeypatch):
    """benchmarks/packing.py on a tiny Llama for one timed step of each configuration (no
    timing is asserted); its report prints the ratio and both padding fractions."""
    from benchmarks import packing

    if not packing.ALPACA.is_file():
        pytest.skip(f"{packing.ALPACA} is not here")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--model", "tiny", "--batch", "2", "--seq", "256", "--warmup", "1", "--steps", "1"]
    raw = {}
    for config in ("padded", "packed"):
        args = packing.parse_args(["--config", config, *argv, "--examples", "40"])
        raw[config] = [packing.worker(args)]
        assert raw[config][0]["tokens_per_s"] > 0
    padded, packed = raw["padded"][0], raw["packed"][0]
    assert packed["packed_rows"] < packed["train_examples"] and padded["packed_rows"] is None
    assert packed["padding_fraction"] < padded["padding_fraction"]
    lines: list[str] = []
    packing.report({k: {**v[0], "n": 1} for k, v in raw.items()}, raw=raw, out=lines.append)
    text = "\n".join(lines)
    assert "packed / padded tokens/s" in text and "target ≥ 1.8×" in text
    assert f"{packed['padding_fraction']:.1%}" in text
