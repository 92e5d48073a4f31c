"""Stopping a run whose loss or gradient norm is not finite, without losing anything: the
checkpoints that no finite loss confirmed are set aside, and the message names the last good
one."""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.train import checkpoint, rundir
from peftlab.train.config import TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped."""


def diverged(
    accelerator,
    out: Path,
    cfg: TrainConfig,
    step: int,
    loss: float,
    grad_norm,
    state: dict,
    why: str | None = None,
):
    # The loss of `step` came from the weights after step - 1: checkpoints from there on were
    # never confirmed by a finite loss, so they are set aside and the newest earlier one named.
    last, moved = checkpoint.quarantine(out, step - 1, rename=accelerator.is_main_process)
    aside = f" ({', '.join(p.name for p in moved)} set aside: not confirmed good)" if moved else ""
    why = (
        why
        or f"loss={loss} (grad_norm={grad_norm}) at step {step}: training stopped before the update"
    )
    msg = (
        f"{why}. Nothing was overwritten: the last good checkpoint is "
        f"{last if last else 'none (no checkpoint written yet)'}{aside}, and {out / 'adapter'} "
        f"was not written. Lower lr (now {cfg.lr}) in a new run, keep max_grad_norm set, or use "
        f"mixed_precision=no/bf16."
    )
    if accelerator.is_main_process:
        summary = {
            "status": "diverged",
            "error": msg,
            "output_dir": str(out),
            "steps": state["step"],
            "final_loss": state["last_loss"],
            "method": cfg.method,
            "model": cfg.model,
        }
        rundir.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    raise TrainingDiverged(msg)
