"""`peftlab train` end to end: the real SmolLM2 learning a built-in task, SIGKILL + --resume
reproducing an uninterrupted run, DDP over 2 CPU processes matching 1 process, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def _peftlab(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"peftlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _config(tmp_path: Path, tiny_dir: str, **kw) -> Path:
    cfg = {
        "model": tiny_dir,
        "method": "lora",
        "method_args": {"r": 4, "dropout": 0.1, "target_modules": "all-linear"},
        "data": "builtin:sort",
        "data_size": 48,
        "eval_size": 4,
        "eval_exact_match": False,
        "max_steps": 12,
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 2,
        "save_every": 4,
        "progress": False,
        "seed": 3,
        **kw,
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    """Dropout (RNG), gradient accumulation (data position), AdamW and cosine schedule all
    have to be restored for the losses after the resume to match."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    cfg = _config(tmp_path, tiny_dir)
    _peftlab("train", str(cfg), f"output_dir={full}")

    # The victim kills itself with SIGKILL inside the forward of step 10's first micro-batch
    # (training forward 19), after the step-8 checkpoint: a real crash at a known point.
    victim = textwrap.dedent(f"""
        import os, signal, sys
        from transformers import AutoModelForCausalLM
        from peftlab.train import train
        model = AutoModelForCausalLM.from_pretrained({tiny_dir!r})
        calls = [0]
        def hook(module, args):
            calls[0] += module.training
            if calls[0] == 19:
                os.kill(os.getpid(), signal.SIGKILL)
        model.register_forward_pre_hook(hook)
        train({str(cfg)!r}, ["output_dir={killed}"], model=model)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", victim],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "adapter").exists() and max(_losses(killed)) == 9  # it died in step 10
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000008",
    ]

    out = _peftlab("train", "--resume", str(killed))
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == 12
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    diffs = [abs(a[s] - b[s]) for s in range(9, 13)]
    print(
        f"resume: steps 9-12 max |loss diff| {max(diffs):.3g}, bit-identical: {diffs == [0.0] * 4}"
    )
    assert max(diffs) <= 1e-6, (a, b)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == "step-0000008" and summary["status"] == "completed"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_ddp_two_cpu_processes_match_one_process(tiny_dir, tmp_path):
    """Global batch 4 per step: 1 process × batch 4 vs 2 processes (gloo) × batch 2. The loss is
    normalized by the global token count, so the curves agree to float rounding (≤1e-5)."""
    cfg = _config(
        tmp_path,
        tiny_dir,
        method_args={"r": 4, "target_modules": "all-linear"},
        grad_accum=1,
        max_steps=6,
        save_every=0,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _peftlab("train", str(cfg), f"output_dir={one}", "batch_size=4")
    proc = subprocess.run(
        [
            "torchrun",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "-m",
            "peftlab.cli",
            "train",
            str(cfg),
            f"output_dir={two}",
            "batch_size=2",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["strategy"] == "ddp"
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"DDP 2x2 vs 1x4: max |loss diff| over {len(a)} steps {diff:.3g}")
    assert diff <= 1e-5, (a, b)


def test_cli_errors(tiny_dir, tmp_path, capsys):
    """The CLI in-process (the subprocess path is exercised above): each bad input exits 2
    with a message naming the key or file."""
    from peftlab.cli import main

    cfg = _config(tmp_path, tiny_dir, max_steps=1, save_every=0, eval_size=0)

    def run(*args: str) -> tuple[int, str]:
        code = main(["train", str(cfg), *args])
        return code, capsys.readouterr().err

    code, err = run("learning_rate=1")
    assert code == 2 and "unknown config key(s) ['learning_rate']; known keys:" in err
    code, err = run("method=lorra")
    assert code == 2 and "unknown method 'lorra'" in err
    code, err = run("data=missing.jsonl", f"output_dir={tmp_path / 'x'}")
    assert code == 2 and "data file missing.jsonl does not exist" in err
    out = tmp_path / "run"
    assert run(f"output_dir={out}")[0] == 0
    code, err = run(f"output_dir={out}")
    assert code == 2 and f"output_dir {out} is not empty" in err and "overwrite=true" in err
    assert run(f"output_dir={out}", "overwrite=true")[0] == 0
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml there, so it holds no peftlab run" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_lora_learns_a_builtin_task(tmp_path):
    """The bundled SmolLM2-135M with LoRA on builtin:max: training loss falls and exact match
    on 24 held-out prompts rises (before training the model answers in prose: 0 exact)."""
    from peftlab.models import resolve

    try:
        resolve("smollm2-135m")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bundled SmolLM2 unavailable: {e}")
    cfg = REPO / "configs" / "lora.yaml"
    out = tmp_path / "run"
    proc = _peftlab(
        "train",
        str(cfg),
        f"output_dir={out}",
        "data=builtin:max",
        "data_size=200",
        "eval_size=24",
        "max_steps=16",
        "batch_size=8",
        "lr=2e-3",
        "warmup_steps=3",
        "max_length=96",
        "eval_every=0",
        "save_every=0",
        "method_args.r=8",
        "progress=false",
        timeout=900,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = _losses(out)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    print(
        f"loss {first:.3f} -> {last:.3f}; exact match {summary['eval_before']} -> {summary['eval_after']}"
    )
    assert last < 0.5 * first
    assert (
        summary["eval_after"]["eval_exact_match"] > summary["eval_before"]["eval_exact_match"] + 0.2
    )
