"""The run directory: refusing to clobber a run, metrics.jsonl, summary and adapter writes.

Everything a crash could leave half-written is written next to its final name and renamed
into place (:mod:`peftlab.core.fileio`), so readers see the old file or the new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.fileio import atomic_write, replace_dir

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "adapter",
    "tensorboard",
)
"""What a run writes; ``overwrite=true`` removes exactly these."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())[:6]
        raise FileExistsError(
            f"output_dir {out} is not empty (holds {held}); it may hold a run. Pass "
            f"overwrite=true to replace it, `peftlab train --resume {out}` to continue it, or "
            f"choose another output_dir"
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only lines up to ``step``: a killed run may have logged past its last checkpoint."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step] if step else []
    atomic_write(path, "".join(ln + "\n" for ln in kept))


def first_eval(path: Path) -> dict | None:
    if not path.exists():
        return None
    for ln in path.read_text().splitlines():
        d = json.loads(ln)
        if d.get("step") == 0 and "eval_loss" in d:
            return {k: v for k, v in d.items() if k.startswith("eval_")}
    return None


def log(accelerator, out: Path, line: dict, tensorboard: bool) -> None:
    if accelerator.is_main_process:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    if tensorboard:
        accelerator.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])


def save_adapter(model, dest: Path) -> None:
    """Write the adapter next to ``dest`` and swap it in, so a crash never leaves half of one."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peftlab.save_adapter(model, tmp)
    replace_dir(tmp, dest)
