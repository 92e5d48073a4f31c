"""A run directory is sacred (issue #17): resume in the directory itself, checked before
anything is touched; finished runs; what may change on resume; partial metrics lines;
checkpoints only from confirmed weights; one writer (the lock); SIGTERM / Ctrl-C; unreadable
checkpoints; a full disk; SIGKILL fault injection. Tiny models throughout."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import peftlab
from peftlab.core.config import ConfigError
from peftlab.train import TrainingDiverged, checkpoint, lock, rundir, train
from peftlab.train.optim import lr_schedule as _schedule
from peftlab.train.signals import TrainingInterrupted
from tests.tiny_lm import tiny_run_config

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def _cfg(tiny_dir, out, **kw):
    return tiny_run_config(
        kw.pop("model", tiny_dir), out, **{"eval_size": 0, "save_every": 2, **kw}
    )


class Crash(Exception):
    """Stands for a crash (power loss, OOM kill) in the middle of training."""


def _crashing_model(tiny_dir, at: int, error: type[BaseException] = Crash):
    """The tiny model, raising ``error`` in its ``at``-th training forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    calls = [0]

    def hook(module, args):
        calls[0] += module.training
        if calls[0] == at:
            raise error(f"crash in training forward {at}")

    model.register_forward_pre_hook(hook)
    return model


def _crashed_run(tiny_dir, out, at=5, **kw) -> Path:
    """A run that crashed in step ``at`` (checkpoints every 2 steps, so step-2 and step-4)."""
    with pytest.raises(Crash):
        train(_cfg(tiny_dir, out, **kw), model=_crashing_model(tiny_dir, at))
    return Path(out)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _steps(out: Path) -> list[int]:
    return [d["step"] for d in rundir.read_metrics(out / "metrics.jsonl")[0] if "loss" in d]


def _tensors(adapter: Path) -> dict:
    """Every adapter tensor as (dtype, shape, raw bytes): bitwise comparison. (The file bytes
    differ between processes: safetensors writes its metadata in hash-map order.)"""
    t = load_file(adapter / "adapter_model.safetensors")
    return {n: (v.dtype, tuple(v.shape), v.contiguous().view(torch.uint8)) for n, v in t.items()}


def _same_adapter(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[n][:2] == tb[n][:2] and torch.equal(ta[n][2], tb[n][2]) for n in ta
    )


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> Path:
    """An uninterrupted run of ``_cfg`` (6 steps): the adapter every recovered run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(tiny_dir, out))
    return out


# ---- 1. resume continues in DIR, wherever DIR is ---------------------------------------------


def test_resume_continues_in_the_run_directory_wherever_it_is(
    tiny_dir, tmp_path, monkeypatch, reference
):
    """The run records output_dir=runs/lora (relative). From another project that has its own
    runs/lora, after the run directory was moved, --resume continues the moved run in place."""
    (tmp_path / "p1").mkdir()
    monkeypatch.chdir(tmp_path / "p1")
    _crashed_run(tiny_dir, "runs/lora")
    other = tmp_path / "p2" / "runs" / "lora"
    other.mkdir(parents=True)
    (other / "precious.txt").write_text("another project's run")
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "p1" / "runs" / "lora", moved)
    monkeypatch.chdir(tmp_path / "p2")

    summary = train(str(moved), resume=True)
    assert summary["output_dir"] == str(moved) and summary["steps"] == 6
    assert summary["resumed_from"] == "step-0000004"  # not a restart from step 0
    assert _files(other) == {"precious.txt": b"another project's run"}
    assert not (tmp_path / "p1" / "runs" / "lora").exists()  # nothing went to the old path
    assert yaml.safe_load((moved / "config.yaml").read_text())["output_dir"] == str(moved)
    assert _steps(moved) == [1, 2, 3, 4, 5, 6]
    assert _same_adapter(moved / "adapter", reference / "adapter")


# ---- 2. a finished run is not silently retrained ---------------------------------------------


def test_a_finished_run_is_not_retrained(tiny_dir, tmp_path):
    plain = tmp_path / "plain"
    train(_cfg(tiny_dir, plain, max_steps=3, save_every=0))
    before = _files(plain)
    with pytest.raises(ConfigError, match=r"the run is finished \(3 steps.*max_steps=N with N > 3"):
        train(str(plain), resume=True)
    with pytest.raises(ConfigError, match="holds no checkpoint .*save_every=0.*cannot be extended"):
        train(str(plain), ["max_steps=6"], resume=True)
    assert _files(plain) == before  # summary.json, metrics.jsonl and the adapter untouched

    saved = tmp_path / "saved"
    train(_cfg(tiny_dir, saved, max_steps=3, save_every=2))
    assert [p.name for p in checkpoint.all_checkpoints(saved)] == ["step-0000003", "step-0000002"]
    before = _files(saved)
    with pytest.raises(ConfigError, match="the run is finished"):
        train(str(saved), resume=True)
    with pytest.raises(ConfigError, match="finished at step 3; max_steps=2 .* does not extend"):
        train(str(saved), ["max_steps=2"], resume=True)
    assert _files(saved) == before


# ---- 3. a refused resume touches nothing -----------------------------------------------------


def test_a_refused_resume_touches_nothing(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, max_steps=4))
    before = _files(out)
    with pytest.raises(ConfigError, match=r"method_args=\{.*'r': 8.*cannot change on resume"):
        train(str(out), ["max_steps=6", "method_args.r=8"], resume=True)
    assert _files(out) == before

    # config.yaml edited by hand: the checkpoint no longer fits, found before anything is written
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("r: 4", "r: 8"))
    with pytest.raises(ConfigError, match="does not match the model"):
        train(str(out), ["max_steps=6"], resume=True)
    (out / "config.yaml").write_text(text)
    assert _files(out) == before

    summary = train(str(out), ["max_steps=6"], resume=True)  # a plain extension still works
    assert summary["steps"] == 6 and summary["resumed_from"] == "step-0000004"


# ---- 4. what may change on resume, and the schedule of an extension --------------------------


def test_resume_refuses_changes_that_make_another_run(tiny_dir, tmp_path):
    out = _crashed_run(tiny_dir, tmp_path / "run")
    before = _files(out)
    for override, key in [
        ("lr=1e-3", "lr=0.001 (the run has 0.01)"),
        ("seed=1", "seed=1"),
        ("batch_size=2", "batch_size=2"),
        ("data=builtin:reverse", "data='builtin:reverse'"),
        (f"output_dir={tmp_path / 'x'}", "output_dir="),
    ]:
        with pytest.raises(ConfigError) as e:
            train(str(out), [override], resume=True)
        msg = str(e.value)
        assert key in msg and "cannot change on resume" in msg and "\n" not in msg
        assert "only max_steps, epochs, eval_every" in msg
    assert _files(out) == before
    # allowed: frequencies, kept checkpoints, progress; config.yaml records what was used
    summary = train(str(out), ["save_every=3", "keep_checkpoints=1", "log_every=2"], resume=True)
    assert summary["steps"] == 6
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["save_every"], recorded["keep_checkpoints"], recorded["lr"]) == (3, 1, 0.01)


def test_extending_a_finished_run_recomputes_the_schedule(tiny_dir, tmp_path):
    """3 steps of cosine decay, extended to 6: steps 4-6 run at lr·f(s) of the 6-step schedule
    (never at the 3-step schedule's final rate, never 0)."""
    from peftlab.train import TrainConfig

    out = tmp_path / "run"
    train(_cfg(tiny_dir, out, max_steps=3))
    summary = train(str(out), ["max_steps=6"], resume=True)
    assert summary["steps"] == 6 and summary["resumed_from"] == "step-0000003"
    lrs = {d["step"]: d["lr"] for d in rundir.read_metrics(out / "metrics.jsonl")[0]}
    f3 = _schedule(TrainConfig(max_steps=3), warmup=0, total=3)
    f6 = _schedule(TrainConfig(max_steps=6), warmup=0, total=6)
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([1e-2 * f3(s - 1) for s in (1, 2, 3)])
    assert [lrs[s] for s in (4, 5, 6)] == pytest.approx([1e-2 * f6(s - 1) for s in (4, 5, 6)])
    assert min(lrs[s] for s in (4, 5, 6)) > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 6


# ---- 5. a partial metrics line ---------------------------------------------------------------


def test_a_partial_metrics_line_is_dropped(tiny_dir, tmp_path, capsys, reference):
    out = _crashed_run(tiny_dir, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a full disk cut the line short
    capsys.readouterr()
    train(str(out), resume=True)
    assert "dropped 1 incomplete line" in capsys.readouterr().err
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert rundir.read_metrics(out / "metrics.jsonl")[1] == 0
    assert _same_adapter(out / "adapter", reference / "adapter")


# ---- 6. checkpoints hold confirmed weights only ----------------------------------------------


@pytest.mark.parametrize("blowup", [1e30, float("inf")], ids=["huge", "inf"])
def test_divergence_names_a_checkpoint_that_is_good(tiny_dir, tmp_path, blowup):
    """Step 3's update ruins the weights (|w| ≈ 1e30, or inf). The step-3 checkpoint is either
    never written (inf) or set aside (1e30: finite, but the next loss is not); the message
    names step-2, whose weights are finite and ordinary, and a resume from it finishes."""
    out = tmp_path / "run"
    calls = [0]

    def ruin(optimizer, args, kwargs):
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.mul_(blowup).add_(blowup)

    handle = register_optimizer_step_post_hook(ruin)
    try:
        with pytest.raises(TrainingDiverged) as e:
            train(_cfg(tiny_dir, out, save_every=1, keep_checkpoints=1))
    finally:
        handle.remove()
    msg = str(e.value)
    assert "last good checkpoint is " + str(out / "checkpoints" / "step-0000002") in msg
    if blowup == float("inf"):
        assert "weights after step 3 are not finite" in msg
        assert not (out / "checkpoints" / "step-0000003").exists()
    else:
        assert "loss=nan" in msg and "at step 4" in msg
        assert "step-0000003.diverged set aside" in msg
    assert checkpoint.latest(out).name == "step-0000002"
    weights = load_file(out / "checkpoints" / "step-0000002" / "trainable.safetensors")
    assert all(bool(w.isfinite().all()) and float(w.abs().max()) < 10 for w in weights.values())
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"

    summary = train(str(out), resume=True)
    assert summary["resumed_from"] == "step-0000002" and summary["steps"] == 6


# ---- 7. one writer per run directory ---------------------------------------------------------


def _fake_lock(out: Path, pid: int) -> None:
    record = {
        "pid": pid,
        "host": socket.gethostname(),
        "process_started": psutil.Process(pid).create_time(),
        "since": "2025-01-01 00:00:00",
    }
    (out / ".peftlab.lock").write_text(json.dumps(record))


class _Main:
    is_main_process, num_processes = True, 1


def test_one_writer_per_run_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    seen = {}

    def during_training(module, args):  # a second writer while the run trains
        if module.training and not seen:
            seen["lock"] = json.loads((out / ".peftlab.lock").read_text())
            with pytest.raises(lock.RunDirLocked, match=f"pid {os.getpid()} on"):
                lock.acquire(_Main(), out)
            seen["refused"] = True

    model = _crashing_model(tiny_dir, at=10**9)
    model.register_forward_pre_hook(during_training)
    train(_cfg(tiny_dir, out, max_steps=2), model=model)
    assert seen["refused"] and seen["lock"]["pid"] == os.getpid()
    assert not (out / ".peftlab.lock").exists()  # released at the end

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _fake_lock(out, holder.pid)
        before = _files(out)
        for attempt in (
            lambda: train(_cfg(tiny_dir, out, overwrite=True)),
            lambda: train(str(out), ["max_steps=4"], resume=True),
        ):
            with pytest.raises(lock.RunDirLocked) as e:
                attempt()
            assert f"in use by another peftlab run (pid {holder.pid} on" in str(e.value)
            assert str(out / ".peftlab.lock") in str(e.value) and "\n" not in str(e.value)
        from peftlab.cli import main

        capsys.readouterr()
        assert main(["train", "--resume", str(out), "max_steps=4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err
        assert _files(out) == before
    finally:
        holder.kill()
        holder.wait()

    # the holder is gone: its lock is stale and taken over, saying so
    summary = train(str(out), ["max_steps=4"], resume=True)
    assert summary["steps"] == 4
    assert f"left by pid {holder.pid}" in capsys.readouterr().err
    assert not (out / ".peftlab.lock").exists()


def test_a_refused_run_leaves_no_lock_and_no_new_directory(tiny_dir, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(Exception, match="does not exist"):
        train(_cfg(tiny_dir, out, data=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "new").exists()


# ---- 8. SIGTERM and Ctrl-C -------------------------------------------------------------------


def test_ctrl_c_stops_at_a_step_boundary(tiny_dir, tmp_path, reference, capsys):
    """Ctrl-C during step 3: step 3 finishes, its checkpoint and the adapter so far are
    written, and TrainingInterrupted (SystemExit 130) says where. --resume then finishes with
    the uninterrupted run's adapter."""
    out = tmp_path / "run"

    def interrupt(module, args):
        if module.training:
            interrupt.calls += 1
            if interrupt.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)

    interrupt.calls = 0
    handler = signal.getsignal(signal.SIGINT)
    model = _crashing_model(tiny_dir, at=10**9)
    model.register_forward_pre_hook(interrupt)
    with pytest.raises(TrainingInterrupted) as e:
        train(_cfg(tiny_dir, out, save_every=0), model=model)
    assert e.value.code == 130
    assert f"stopped by SIGINT after step 3 of 6: checkpoint {out}/checkpoints/step-0000003" in str(
        e.value
    )
    assert checkpoint.latest(out).name == "step-0000003" and (out / "adapter").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("interrupted", 3)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert not (out / ".peftlab.lock").exists()

    summary = train(str(out), resume=True)
    assert summary["resumed_from"] == "step-0000003" and summary["steps"] == 6
    assert _same_adapter(out / "adapter", reference / "adapter")


def test_a_second_signal_exits_at_once(tiny_dir, tmp_path):
    out = tmp_path / "run"

    def twice(module, args):
        if module.training:
            twice.calls += 1
            if twice.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    twice.calls = 0
    model = _crashing_model(tiny_dir, at=10**9)
    model.register_forward_pre_hook(twice)
    with pytest.raises(TrainingInterrupted, match="second signal") as e:
        train(_cfg(tiny_dir, out), model=model)
    assert e.value.code == 143
    assert checkpoint.latest(out).name == "step-0000002"  # step 3 was not finished
    assert train(str(out), resume=True)["steps"] == 6


def _cli_config(tmp_path: Path, tiny_dir: str, **kw) -> Path:
    cfg = {
        "model": tiny_dir,
        "method": "lora",
        "method_args": {"r": 4, "dropout": 0.1, "target_modules": "all-linear"},
        "data": "builtin:sort",
        "data_size": 48,
        "eval_size": 0,
        "max_steps": 150,
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "save_every": 0,
        "progress": False,
        "seed": 3,
        **kw,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "train", *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigterm_leaves_a_resumable_checkpoint_and_the_adapter(tiny_dir, tmp_path):
    """`peftlab train` gets SIGTERM mid-run: exit 143, no traceback, a checkpoint of the last
    finished step and the adapter so far; --resume finishes with exactly the adapter of an
    uninterrupted run (dropout, accumulation and warmup + cosine restored)."""
    cfg = _cli_config(tmp_path, tiny_dir)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    ref = _cli(str(cfg), f"output_dir={full}")
    victim = _cli(str(cfg), f"output_dir={stopped}")
    deadline = time.monotonic() + 600
    while not any(s >= 3 for s in _steps(stopped)) and victim.poll() is None:
        assert time.monotonic() < deadline, "the victim never started training"
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM after step" in err
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 3 <= summary["steps"] < 150
    assert checkpoint.latest(stopped).name == f"step-{summary['steps']:07d}"
    assert peftlab.read_adapter_config(stopped / "adapter")
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-3000:]

    resumed = _cli("--resume", str(stopped))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 150
    assert _same_adapter(stopped / "adapter", full / "adapter")


# ---- 9. unreadable checkpoints ---------------------------------------------------------------


def test_an_unreadable_checkpoint_falls_back_to_an_intact_one(
    tiny_dir, tmp_path, capsys, reference
):
    out = _crashed_run(tiny_dir, tmp_path / "run")
    newest, older = out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000002"
    intact = (older / "optimizer.pt").read_bytes()
    blob = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    (older / "optimizer.pt").write_bytes(b"not a checkpoint")
    before = _files(out)
    with pytest.raises(ConfigError, match="no intact checkpoint .*step-0000004, step-0000002"):
        train(str(out), resume=True)
    assert _files(out) == before

    (older / "optimizer.pt").write_bytes(intact)
    capsys.readouterr()
    summary = train(str(out), resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err
    assert "resuming from step-0000002, the newest intact checkpoint" in err
    assert summary["resumed_from"] == "step-0000002" and summary["steps"] == 6
    assert _same_adapter(out / "adapter", reference / "adapter")


# ---- 10. a full disk -------------------------------------------------------------------------


def _no_space(path: Path, partial: bytes = b"") -> None:
    Path(path).write_bytes(partial)
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def test_a_full_disk_while_checkpointing(tiny_dir, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    real, calls = checkpoint.save_file, [0]

    def save_file(tensors, path, *a, **kw):
        calls[0] += 1
        return _no_space(path, b"partial") if calls[0] == 2 else real(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(OSError) as e:
        train(_cfg(tiny_dir, out))
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in msg
    assert f"could not write {out / 'checkpoints' / 'step-0000004'}: no space left" in msg
    assert f"peftlab train --resume {out}" in msg
    assert _leftovers(out) == []
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed
    assert train(str(out), resume=True)["resumed_from"] == "step-0000002"
    assert _same_adapter(out / "adapter", reference / "adapter")


def test_a_full_disk_while_saving_the_adapter(tiny_dir, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    real = peftlab.save_adapter

    def save_adapter(model, path):
        Path(path).mkdir(parents=True)
        _no_space(Path(path) / "adapter_model.safetensors", b"partial")

    monkeypatch.setattr(peftlab, "save_adapter", save_adapter)
    with pytest.raises(OSError, match=f"could not write {out / 'adapter'}: no space left"):
        train(_cfg(tiny_dir, out))
    assert _leftovers(out) == [] and not (out / "adapter").exists()
    monkeypatch.setattr(peftlab, "save_adapter", real)
    summary = train(str(out), resume=True)  # from the final checkpoint: nothing to retrain
    assert summary["resumed_from"] == "step-0000006" and summary["steps"] == 6
    assert _same_adapter(out / "adapter", reference / "adapter")


def test_a_full_disk_while_logging(tiny_dir, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    real = rundir._append

    def append(path, text):
        if '"step": 5' in text and '"loss"' in text:
            with path.open("a") as f:
                f.write(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(rundir, "_append", append)
    with pytest.raises(OSError, match=f"could not write {out / 'metrics.jsonl'}: no space left"):
        train(_cfg(tiny_dir, out))
    monkeypatch.setattr(rundir, "_append", real)
    train(str(out), resume=True)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert _same_adapter(out / "adapter", reference / "adapter")


# ---- 11. SIGKILL at random moments -----------------------------------------------------------


def test_sigkill_fault_injection_short():
    """scripts/fault_injection.py with 3 kills (the full run, 12 kills, is in
    docs/reliability.md): resume after each, the final adapter bitwise the reference's."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fault_injection.py"), "--kills", "3"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kills"] == 3 and result["adapter_identical"] and result["losses_identical"]
