"""The trainer's device and process plumbing: accelerate's Accelerator for a run, and sums
across processes (DDP or FSDP under ``torchrun`` / ``accelerate launch``; FSDP is
:mod:`peftlab.train.fsdp`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from peftlab.core.config import ConfigError
from peftlab.train import fsdp
from peftlab.train.config import TrainConfig


def make_accelerator(cfg: TrainConfig, out: Path):
    """accelerate's Accelerator for this run, after the checks that need to know the device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; drop it (keeping the process group) so that a
    # second train() in the same process may use another mixed_precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU.
        cpu=no_accelerator(),
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(out),
    )
    if cfg.tensorboard and not any(
        importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")
    ):
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; on CPU use 'bf16' or 'no'")
    fsdp.check_launch(cfg, accelerator)  # FSDP needs 2+ processes
    return accelerator


def no_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def reduce_sum(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()
