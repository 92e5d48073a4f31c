"""Resumable checkpoints, written atomically.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding the trainable parameters
(``trainable.safetensors``), the optimizer, scheduler and loss-scaler states
(``optimizer.pt``), each process's RNG states (``rng-<rank>.pt``) and the loop's position
(``trainer_state.json``: step, micro-batches consumed, token counts). It is written under a
``.tmp`` name and renamed into place (:func:`peftlab.core.fileio.replace_dir`), so a run
killed at any moment leaves either the complete checkpoint or none: ``latest`` never returns
a half-written one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.core.fileio import replace_dir

_NAME = re.compile(r"^step-(\d+)$")


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    root = Path(run_dir) / "checkpoints"
    done = [
        (int(m.group(1)), p)
        for p in root.glob("step-*")
        if (m := _NAME.match(p.name)) and p.is_dir()
    ]
    return max(done)[1] if done else None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once, which safetensors requires.
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    accelerator,
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the ``keep`` newest.

    Every process writes its RNG state; the main process writes the rest (with DDP the
    parameters and optimizer state are identical on every process).
    """
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if accelerator.scaler is not None:
            extra["scaler"] = accelerator.scaler.state_dict()
        torch.save(extra, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        replace_dir(tmp, final)  # fsyncs every file before the rename makes it visible
        root = final.parent
        done = sorted(int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name)))
        for old in done[:-keep]:
            shutil.rmtree(root / f"step-{old:07d}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(path: Path, model: nn.Module, optimizer, scheduler, accelerator) -> dict:
    """Restore a checkpoint into the (unwrapped) ``model``, optimizer, scheduler and RNGs."""
    path = Path(path)
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
            f"{extra[:5]}; was the run's config.yaml (method, method_args, model) changed?"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if "scaler" in extra and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(extra["scaler"])
    rng = path / f"rng-{accelerator.process_index}.pt"
    # A resume with more processes than the run had: the new ones start from rank 0's RNG.
    set_rng_state(torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
