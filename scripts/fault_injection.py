"""Fault injection: SIGKILL ``peftlab train`` at random moments, resume, compare bitwise.

A tiny causal LM (tests/tiny_lm.py) trains with LoRA (dropout on, gradient accumulation,
warmup + cosine) and ``save_every=1``. One uninterrupted run gives the reference adapter. A
second run is killed with SIGKILL ``--kills`` times — half of the kills aimed at checkpoint
writes (sent as soon as a ``step-N.tmp`` directory shows up), half after a random delay — and
continued with ``peftlab train --resume`` after each kill. After every kill each complete
checkpoint must read back whole (:func:`peftlab.train.checkpoint.read`); at the end the final
adapter's tensors must be bit-for-bit the reference's and the loss curves equal.

    python scripts/fault_injection.py                 # 12 kills
    python scripts/fault_injection.py --kills 3       # the short version tests/unit/test_rundir.py runs

Prints one line per kill and a final JSON line; exits 0 when the adapters are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab.cli", "train", *args]


def _steps_done(run: Path) -> int:
    from peftlab.train import checkpoint

    last = checkpoint.latest(run)
    return checkpoint.step_of(last) if last else 0


def _in_checkpoint_write(run: Path) -> bool:
    return any((run / "checkpoints").glob("*.tmp")) if (run / "checkpoints").is_dir() else False


def _losses(run: Path) -> dict[int, float]:
    from peftlab.train.rundir import read_metrics

    return {d["step"]: d["loss"] for d in read_metrics(run / "metrics.jsonl")[0] if "loss" in d}


def _adapter(run: Path) -> dict:
    """The adapter's config and every tensor's name, dtype, shape and raw bytes. (The file
    bytes themselves are not compared: safetensors writes its metadata in hash-map order,
    which differs between processes.)"""
    from safetensors.torch import load_file

    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    return {
        "config": (run / "adapter" / "adapter_config.json").read_bytes(),
        "tensors": {
            n: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).tolist())
            for n, t in sorted(tensors.items())
        },
    }


def _check_checkpoints(run: Path) -> None:
    """Every checkpoint a resume could pick reads back whole."""
    from peftlab.train import checkpoint

    for ckpt in checkpoint.all_checkpoints(run):
        checkpoint.read(ckpt)  # raises checkpoint.Unreadable


def _kill_once(cmd: list[str], run: Path, aim: str, rng: random.Random, limit: float) -> dict:
    """Start ``cmd``; once it has trained a step, SIGKILL it (at a checkpoint write, or after a
    random delay). Returns what happened; ``killed`` is False if it finished first."""
    start_step = _steps_done(run)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + limit
    try:
        while _steps_done(run) <= start_step and proc.poll() is None:  # startup, first step
            if time.monotonic() > deadline:
                raise TimeoutError(f"no step within {limit:.0f} s: {' '.join(cmd)}")
            time.sleep(0.01)
        if aim == "checkpoint":
            while not _in_checkpoint_write(run) and proc.poll() is None:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()}")
            return {"killed": False}
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return {
        "killed": True,
        "aim": aim,
        "inside_checkpoint_write": _in_checkpoint_write(run),
        "checkpoint_step": _steps_done(run),
    }


def run(kills: int, steps: int, seed: int, workdir: Path, limit: float = 300.0) -> dict:
    from tests.tiny_lm import save_tiny_lm

    rng = random.Random(seed)
    model = save_tiny_lm(workdir / "lm")
    cfg = workdir / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "method": "lora",
                "method_args": {"r": 4, "dropout": 0.1, "target_modules": "all-linear"},
                "data": "builtin:sort",
                "data_size": 48,
                "eval_size": 0,
                "max_steps": steps,
                "batch_size": 2,
                "grad_accum": 2,
                "lr": 1e-2,
                "warmup_steps": 2,
                "save_every": 1,
                "progress": False,
                "seed": 3,
            }
        )
    )
    ref, victim = workdir / "reference", workdir / "victim"
    t0 = time.monotonic()
    subprocess.run(
        _cli(str(cfg), f"output_dir={ref}"), cwd=REPO, env=ENV, check=True, capture_output=True
    )
    events = []
    while len(events) < kills:
        cmd = (
            _cli("--resume", str(victim))
            if victim.exists()
            else _cli(str(cfg), f"output_dir={victim}")
        )
        aim = "checkpoint" if len(events) % 2 == 0 else "random"
        event = _kill_once(cmd, victim, aim, rng, limit)
        if not event["killed"]:
            break  # the run finished before this kill: too few steps for the kills asked
        _check_checkpoints(victim)
        events.append(event)
        print(
            f"kill {len(events)}: {aim:10s} at checkpoint step {event['checkpoint_step']:3d}"
            f"{', inside a checkpoint write' if event['inside_checkpoint_write'] else ''}",
            flush=True,
        )
    from peftlab.train.resume import finished_steps

    proc = subprocess.run(
        _cli("--resume", str(victim)), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    if proc.returncode != 0 and finished_steps(victim) is None:
        raise RuntimeError(f"the final resume failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    a, b = _losses(ref), _losses(victim)
    result = {
        "kills": len(events),
        "inside_checkpoint_writes": sum(e["inside_checkpoint_write"] for e in events),
        "steps": steps,
        "adapter_identical": _adapter(ref) == _adapter(victim),
        "losses_identical": a == b and sorted(a) == list(range(1, steps + 1)),
        "seconds": round(time.monotonic() - t0, 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs to send (default 12)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 8 per kill)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill timing")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here")
    args = p.parse_args(argv)
    steps = args.steps or max(12, 8 * args.kills)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.kills, steps, args.seed, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as d:
            result = run(args.kills, steps, args.seed, Path(d))
    print(json.dumps(result), flush=True)
    ok = result["adapter_identical"] and result["losses_identical"]
    return 0 if ok and result["kills"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
