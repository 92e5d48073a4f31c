"""FSDP2 training (``distributed: {strategy: fsdp}``) on two CPU processes (gloo, torchrun):
the same losses and adapter as one process with the same global batch, a SIGKILLed run that
resumes onto the uninterrupted curve, and the refusals. See peftlab/train/fsdp.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.core.config import ConfigError
from peftlab.train import TrainConfig, checkpoint, fsdp, train
from tests.tiny_lm import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="no torchrun")


def _config(tiny_dir: str, out: Path, **keys) -> dict:
    """6 steps of 2 micro-batches (grad_accum 2) of 4 examples globally; the validation loss
    after training (the LoRA runs also evaluate before, with greedy generation, so that the
    gathered evaluation runs with answers of different lengths on the two processes)."""
    quick = {"eval_before": False, "eval_exact_match": False}
    return tiny_run_config(tiny_dir, out, grad_accum=2, eval_size=8, **{**quick, **keys})


def _torchrun(tmp_path: Path, target: list[str], timeout: int = 240):
    # --standalone: torchrun picks a free port itself (no race with other processes for one)
    return subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", *target],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fsdp_train(tmp_path: Path, cfg: dict, *args: str) -> Path:
    path = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _torchrun(tmp_path, ["-m", "peftlab.cli", "train", str(path), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(cfg["output_dir"])


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.fixture(scope="module")
def lora_runs(tiny_dir, tmp_path_factory):
    """LoRA: one process × batch 4, and FSDP on 2 processes × batch 2 (checkpoints every 2)."""
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    one = tmp / "one"
    full = {"eval_before": True, "eval_exact_match": True}
    train(_config(tiny_dir, one, batch_size=4, **full))
    cfg = _config(tiny_dir, tmp / "two", batch_size=2, save_every=2, distributed=_FSDP, **full)
    return one, _fsdp_train(tmp, cfg)


_FSDP = {"strategy": "fsdp"}


def _assert_same_run(one: Path, two: Path) -> None:
    """Losses over the 6 steps and the saved adapter (files, config, tensors) within 1e-5."""
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"FSDP 2x2 vs 1x4: max |loss diff| over 6 steps {diff:.3g}")
    assert diff <= 1e-5, (a, b)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "fsdp"
    assert json.loads((one / "summary.json").read_text())["strategy"] is None  # one process
    assert sorted(p.name for p in (one / "adapter").iterdir()) == sorted(
        p.name for p in (two / "adapter").iterdir()
    )
    conf = [json.loads((r / "adapter" / "adapter_config.json").read_text()) for r in (one, two)]
    assert conf[0] == conf[1]
    ta, tb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (one, two))
    assert sorted(ta) == sorted(tb) and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype == torch.float32 and ta[k].shape == tb[k].shape, k
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-5)


@needs_torchrun
def test_lora_fsdp_two_processes_match_one_process(lora_runs):
    one, two = lora_runs
    _assert_same_run(one, two)
    evals = [json.loads((r / "summary.json").read_text()) for r in (one, two)]
    for key in ("eval_before", "eval_after"):
        assert evals[1][key]["eval_exact_match"] == evals[0][key]["eval_exact_match"]
        assert abs(evals[1][key]["eval_loss"] - evals[0][key]["eval_loss"]) <= 1e-5
    ckpt = two / "checkpoints" / "step-0000006"
    assert (ckpt / "sharded" / ".metadata").is_file() and (ckpt / "rng-1.pt").is_file()
    assert not (ckpt / "trainable.safetensors").exists()  # no process holds it whole


@needs_torchrun
def test_dora_fsdp_two_processes_match_one_process(tiny_dir, tmp_path):
    dora = {"method": "dora", "method_args": {"r": 4, "target_modules": "all-linear"}}
    one = tmp_path / "one"
    train(_config(tiny_dir, one, batch_size=4, **dora))
    cfg = _config(tiny_dir, tmp_path / "two", batch_size=2, distributed=_FSDP, **dora)
    _assert_same_run(one, _fsdp_train(tmp_path, cfg))


@needs_torchrun
def test_lora_on_the_embeddings_under_fsdp_matches_one_process(tiny_dir, tmp_path):
    """LoRA on the input embedding table (outside the decoder layers FSDP shards as units)."""
    lora = {"method": "lora", "method_args": {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}}
    one = tmp_path / "one"
    train(_config(tiny_dir, one, batch_size=4, **lora))
    cfg = _config(tiny_dir, tmp_path / "two", batch_size=2, distributed=_FSDP, **lora)
    two = _fsdp_train(tmp_path, cfg)
    _assert_same_run(one, two)
    keys = load_file(two / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys


@needs_torchrun
def test_sigkill_then_resume_matches_the_uninterrupted_fsdp_run(tiny_dir, tmp_path, lora_runs):
    """Rank 1 SIGKILLs itself in step 5, after the step-4 checkpoint; torchrun tears the other
    process down. Resumed on 2 processes, steps 5-6 equal the uninterrupted run's bit for bit
    (parameters, AdamW state, schedule and data position come back from the shards), and so
    does the adapter; with the step-4 shards damaged, the resume continues from step 2."""
    killed = tmp_path / "killed"
    cfg = _config(tiny_dir, killed, batch_size=2, save_every=2, distributed=_FSDP)
    victim = tmp_path / "victim.py"
    victim.write_text(
        textwrap.dedent(f"""
        import os, signal
        from peftlab.train import train

        class Kill:
            def on_train_start(self, model): pass
            def on_train_end(self, model): pass
            def on_step_end(self, rec):
                if rec.step == 5 and os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGKILL)

        train({cfg!r}, callbacks=[Kill()])
        """)
    )
    proc = _torchrun(tmp_path, [str(victim)])
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-2000:]
    assert not (killed / "adapter").exists()
    assert [c.name for c in checkpoint.all_checkpoints(killed)] == ["step-0000004", "step-0000002"]

    # A copy whose newest checkpoint lost the end of rank 1's shard file: every process sees
    # it unreadable, and the resume falls back to step 2.
    damaged = tmp_path / "damaged"
    shutil.copytree(killed, damaged)
    shard = damaged / "checkpoints" / "step-0000004" / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    full = _losses(lora_runs[1])
    adapter = load_file(lora_runs[1] / "adapter" / "adapter_model.safetensors")
    for run, start in ((killed, 4), (damaged, 2)):
        proc = _torchrun(tmp_path, ["-m", "peftlab.cli", "train", "--resume", str(run)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["resumed_from"] == f"step-{start:07d}" and summary["steps"] == 6
        b = _losses(run)
        assert sorted(b) == list(range(1, 7))
        later = range(start + 1, 7)
        assert [b[s] for s in later] == [full[s] for s in later], (start, full, b)
        resumed = load_file(run / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(adapter[k], resumed[k]) for k in adapter)
    assert "step-0000004 is unreadable" in proc.stderr, proc.stderr[-2000:]


@needs_torchrun
def test_resume_on_another_number_of_processes_is_refused(lora_runs, tmp_path):
    """The 2-process shards offered to a 1-process FSDP model: one line naming both counts."""
    import torch.distributed as dist

    from tests.conftest import tiny_llama

    class Acc:
        num_processes, process_index, scaler = 1, 0, None

    saved = checkpoint.read(lora_runs[1] / "checkpoints" / "step-0000006")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        import peftlab

        model = tiny_llama()
        peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules="all-linear"))
        cfg = TrainConfig(distributed=_FSDP)
        fsdp.shard(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with pytest.raises(ConfigError) as e:
            checkpoint.apply(saved, model, opt, sched, Acc())
    finally:
        dist.destroy_process_group()
    msg = str(e.value)
    assert "\n" not in msg and "FSDP shards of 2 processes" in msg
    assert "--nproc_per_node=2" in msg and "not 1" in msg


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({"distributed": {"strategy": "zero3"}}, "distributed.strategy='zero3' is invalid"),
        ({"distributed": {"strategy": "fsdp", "shards": 2}}, "with the key(s) strategy"),
        ({"distributed": "fsdp"}, "distributed"),
        ({"distributed": _FSDP, "method": "qlora"}, "'ddp' with method 'qlora'"),
        ({"distributed": _FSDP, "mixed_precision": "fp16"}, "use mixed_precision 'bf16'"),
        ({"distributed": _FSDP, "optimizer": "adamw_8bit"}, "use optimizer 'adamw'"),
    ],
)
def test_bad_distributed_configs_are_one_line_errors(keys, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**keys)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_distributed_defaults_to_ddp_and_is_recorded():
    assert TrainConfig().distributed == {"strategy": "ddp"}
    assert TrainConfig(distributed={}).distributed == {"strategy": "ddp"}
    assert TrainConfig(distributed=_FSDP).to_dict()["distributed"] == _FSDP


def test_fsdp_on_one_process_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"is invalid on 1 process.*--nproc_per_node=N"):
        train(_config(tiny_dir, tmp_path / "run", distributed=_FSDP))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_accelerate_fsdp_plugin_is_refused(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="set distributed: {strategy: fsdp} in the config"):
        train(_config(tiny_dir, tmp_path / "run"))


def test_units_are_the_decoder_layers():
    from tests.conftest import tiny_bert, tiny_llama

    llama = tiny_llama()
    assert fsdp.units(llama) == list(llama.model.layers)
    assert all(type(u).__name__ in ("BertLayer", "BertEmbeddings") for u in fsdp.units(tiny_bert()))


def test_fused_adamw_counts_its_writes_so_dora_sees_the_new_weights():
    """torch's fused AdamW writes parameters without bumping ``Tensor._version``, on which
    DoRA's row-norm cache is keyed; make_optimizer counts the writes, so the forward after a
    step uses the norm of the new weights (found comparing FSDP, which drops the cache, with
    one process)."""
    import peftlab
    from peftlab.train.optim import make_optimizer
    from tests.conftest import tiny_llama

    model = tiny_llama().train()
    peftlab.apply(model, peftlab.DoRAConfig(r=4, target_modules="all-linear"))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    versions = [p._version for g in opt.param_groups for p in g["params"]]
    opt.step()
    assert all(p._version > v for g in opt.param_groups for p, v in zip(g["params"], versions))
    cached = model(input_ids=ids, labels=ids).loss
    for m in model.modules():
        if callable(getattr(m, "_invalidate", None)):
            m._invalidate()
    assert cached.item() == model(input_ids=ids, labels=ids).loss.item()
