"""The training loop in-process on tiny models: config checks, schedule, token-normalized
accumulation, metrics and run layout, NaN stop, classification, and transformers.Trainer."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.train import TrainConfig, TrainingDiverged, train
from peftlab.train.optim import lr_schedule as _schedule
from tests.conftest import tiny_bert
from tests.tiny_lm import char_tokenizer, tiny_run_config


def _cfg(tiny_dir, out, **kw):
    return tiny_run_config(
        kw.pop("model", tiny_dir), out, **{"eval_size": 8, "eval_exact_match": False, **kw}
    )


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_config_errors_name_the_key():
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) \['bacth_size'\]; known keys: model, method"
    ):
        TrainConfig.from_dict({"bacth_size": 4})
    with pytest.raises(
        ConfigError, match="method: unknown method 'lorra'; registered methods: .*lora"
    ):
        TrainConfig(method="lorra")
    with pytest.raises(ConfigError, match="method_args: unknown option"):
        TrainConfig(method_args={"rank": 8})
    with pytest.raises(ConfigError, match="mixed_precision='fp32' is invalid"):
        TrainConfig(mixed_precision="fp32")
    with pytest.raises(ConfigError, match="override 'lr' must look like key=value"):
        train({}, ["lr"])


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method_args: {r: 16}\nlr: 2e-4\nmax_steps: 10\n")
    cfg = TrainConfig.load(
        path, ["method_args.r=8", "method_args.target_modules=[q_proj, v_proj]", "lr=1e-3"]
    )
    assert cfg.method_args == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert cfg.lr == 1e-3 and cfg.max_steps == 10 and cfg.epochs is None
    assert TrainConfig.load(path).lr == 2e-4  # YAML reads "2e-4" as a string; accepted as a float


def test_warmup_then_cosine():
    f = _schedule(
        TrainConfig(max_steps=10, lr_schedule="cosine", min_lr_ratio=0.1), warmup=2, total=10
    )
    assert [round(f(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1)


def test_run_layout_metrics_and_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(tiny_dir, out, eval_every=3, eval_exact_match=True, eval_size=4))
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "adapter",
        "summary.json",
    }
    lines = _metrics(out)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7))
    for m in steps:
        assert {"step", "loss", "lr", "tokens", "loss_tokens", "step_time", "epoch"} <= set(m)
        assert m["tokens"] > m["loss_tokens"] > 0 and m["step_time"] > 0
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    assert {"eval_ppl", "eval_exact_match"} <= set(evals[0])
    assert summary["steps"] == 6 and summary["eval_before"]["eval_loss"] == evals[0]["eval_loss"]
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert json.loads((out / "summary.json").read_text())["final_loss"] == steps[-1]["loss"]
    assert peftlab.read_adapter_config(out / "adapter")  # a loadable adapter directory

    with pytest.raises(FileExistsError, match="is not empty.*overwrite=true.*--resume"):
        train(_cfg(tiny_dir, out))
    train(_cfg(tiny_dir, out, max_steps=2, overwrite=True, eval_size=0))
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_grad_accum_matches_one_big_batch(tiny_dir, tmp_path):
    """Loss is normalized by the tokens of the whole step, so 2 × 2 accumulated examples train
    exactly like one batch of 4 (up to float rounding from the different padding)."""
    a = train(_cfg(tiny_dir, tmp_path / "a", batch_size=4, grad_accum=1, eval_size=0))
    b = train(_cfg(tiny_dir, tmp_path / "b", batch_size=2, grad_accum=2, eval_size=0))
    la = [m["loss"] for m in _metrics(tmp_path / "a")]
    lb = [m["loss"] for m in _metrics(tmp_path / "b")]
    assert len(la) == 6 and a["loss_tokens"] == b["loss_tokens"]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_adapter(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, save_every=3, eval_size=0))
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    calls = {"n": 0}

    def poison(module, args, output):  # NaN logits from the 3rd training forward on
        calls["n"] += module.training
        return output * float("nan") if calls["n"] >= 3 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(
        TrainingDiverged, match=r"loss=nan .* at step 9.*last good checkpoint is .*step-0000006"
    ):
        train(str(out), ["max_steps=12"], model=model, resume=True)
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_classification_trains_head_and_reports_accuracy(tmp_path):
    rows = ["text,label"] + [f"{'good' if i % 2 else 'bad'} movie {i},{i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    model = tiny_bert()
    head = model.classifier.weight.detach().clone()
    embed = model.bert.embeddings.word_embeddings.weight.detach().clone()
    summary = train(
        {
            "model": "unused",
            "method": "lora",
            "method_args": {"r": 4, "target_modules": ["query", "value"]},
            "data": str(tmp_path / "d.csv"),
            "eval_size": 8,
            "max_steps": 5,
            "batch_size": 8,
            "lr": 1e-2,
            "progress": False,
            "output_dir": str(tmp_path / "run"),
        },
        model=model,
        tokenizer=char_tokenizer(),
    )
    assert set(summary["eval_after"]) == {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_mcc"}
    assert not torch.equal(model.classifier.weight, head)  # the new head trained (modules_to_save)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embed)  # the base stays frozen


def test_transformers_trainer_trains_a_peftlab_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.conftest import tiny_llama

    model = peftlab.apply(
        tiny_llama(), peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 4 and len(losses) == 4 and losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all("lora_" in n for n in changed)
    peftlab.save_adapter(model, tmp_path / "a")


def test_bf16_with_checkpointing_on_cpu_and_fp16_refused(tiny_dir, tmp_path):
    summary = train(
        _cfg(
            tiny_dir,
            tmp_path / "bf16",
            mixed_precision="bf16",
            max_steps=2,
            eval_size=0,
            gradient_checkpointing=True,
        )
    )
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    with pytest.raises(ConfigError, match="fp16' needs a CUDA device"):
        train(_cfg(tiny_dir, tmp_path / "fp16", mixed_precision="fp16"))


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint write that fails (ENOSPC at the rename) leaves the previous checkpoint of
    the same step whole and nothing half-written that ``latest`` could return."""
    import errno
    import os
    import types

    from peftlab.core import fileio
    from peftlab.train import checkpoint

    acc = types.SimpleNamespace(
        is_main_process=True, process_index=0, scaler=None, wait_for_everyone=lambda: None
    )
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    first = checkpoint.save(acc, tmp_path, 1, model, opt, sched, {"step": 1}, keep=2)
    weights = (first / "trainable.safetensors").read_bytes()
    real = os.replace

    def full_disk(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match=r"(?i)could not write .*step-0000001: no space left") as e:
        checkpoint.save(acc, tmp_path, 1, model, opt, sched, {"step": 1}, keep=2)
    assert e.value.errno == errno.ENOSPC
    assert checkpoint.latest(tmp_path) == first
    assert (first / "trainable.safetensors").read_bytes() == weights
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-0000001"]


def test_overrides_are_typed_and_a_bad_one_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method_args: {r: 16, alpha: 32}\nmax_steps: 10\n")
    cfg = TrainConfig.load(path, ["lr=5e-4", "method_args.r=4", "eval_data=null"])
    assert cfg.lr == 5e-4 and cfg.method_args == {"r": 4, "alpha": 32} and cfg.eval_data is None
    with pytest.raises(ConfigError, match=r"override 'max_steps\.x=1': max_steps is 10, not a"):
        TrainConfig.load(path, ["max_steps.x=1"])
    with pytest.raises(ConfigError, match=r"override 'method_args\.r=\[4': the value '\[4' is not"):
        TrainConfig.load(path, ["method_args.r=[4"])


class _Recorder:
    """A TrainCallback that keeps what it was told, in order."""

    def __init__(self):
        self.events = []

    def on_train_start(self, model):
        self.events.append(("start", model))

    def on_step_end(self, record):
        self.events.append(("step", record))

    def on_train_end(self, model):
        self.events.append(("end", model))


def test_callbacks_get_the_model_and_one_record_per_step(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftlab.train.callbacks import StepRecord, TrainCallback

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    rec = _Recorder()
    assert isinstance(rec, TrainCallback)
    out = tmp_path / "run"
    summary = train(
        _cfg(tiny_dir, out, max_steps=3, batch_size=2, grad_accum=2, eval_size=0),
        model=model,
        callbacks=[rec],
    )
    assert [kind for kind, _ in rec.events] == ["start", "step", "step", "step", "end"]
    assert rec.events[0][1] is model and rec.events[-1][1] is model
    records = [r for kind, r in rec.events if kind == "step"]
    assert all(isinstance(r, StepRecord) for r in records)
    logged = [m for m in _metrics(out) if "loss" in m]
    for r, m in zip(records, logged, strict=True):  # the log is the records, field for field
        assert (r.step, r.loss, r.lr, r.tokens, r.loss_tokens, r.step_time, r.grad_norm) == (
            m["step"], m["loss"], m["lr"], m["tokens"], m["loss_tokens"], m["step_time"],
            m["grad_norm"],
        )  # fmt: skip
        assert r.tokens > r.loss_tokens > 0 and r.batch_length > 0
    assert sum(r.tokens for r in records) == summary["tokens"]
    assert summary["longest_batch"] == max(r.batch_length for r in records)
    assert "peak_memory" not in summary  # measuring is the bench's, from outside


def _imported_modules(tree, package: str) -> set[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth (function bodies
    included), relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_trainer_imports_nothing_from_the_bench_and_never_synchronizes():
    import peftlab.train

    files = sorted(Path(peftlab.train.__file__).parent.glob("*.py"))
    assert any(f.name == "loop.py" for f in files)
    for path in files:
        tree = ast.parse(path.read_text())
        modules = _imported_modules(tree, "peftlab.train")
        bench = sorted(m for m in modules if m == "peftlab.bench" or m.startswith("peftlab.bench."))
        assert not bench, f"{path.name} imports {bench}"
        syncs = [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) == "synchronize"
        ]
        assert not syncs, f"{path.name} synchronizes the device at lines {syncs}"
