"""The run directory: refusing to clobber a run, metrics.jsonl, summary and adapter writes.

Everything a crash could leave half-written is written next to its final name and renamed
into place (:mod:`peftlab.core.fileio`), so readers see the old file or the new one.
A write that fails (a full disk) removes its temporary file and raises one ``OSError`` that
names the path (:func:`write_error`); :func:`clean_leftovers` removes what a killed run left.
metrics.jsonl is appended to, so a full disk or a kill can leave a partial last line:
:func:`read_metrics` drops it and keeps every complete line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.fileio import atomic_write as _atomic_write
from peftlab.core.fileio import replace_dir

LOCK_FILE = ".peftlab.lock"
"""The run directory's lock (:mod:`peftlab.train.lock`); not part of the run."""

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "adapter",
    "tensorboard",
)
"""What a run writes; ``overwrite=true`` removes exactly these."""


def remove_run_files(out: Path) -> None:
    """Remove what a new run wrote in ``out`` (:data:`RUN_FILES`), so that one which failed
    before its first step leaves the directory as :func:`check_output_dir` found it: empty."""
    for name in RUN_FILES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    held = [n for n in held if not n.startswith(LOCK_FILE)]  # the lock is not part of a run
    if held and not overwrite:
        raise FileExistsError(
            f"output_dir {out} is not empty (holds {held[:6]}); it may hold a run. Pass "
            f"overwrite=true to replace it, `peftlab train --resume {out}` to continue it, or "
            f"choose another output_dir"
        )


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The complete lines of metrics.jsonl, and how many partial or corrupt lines were dropped
    (a full disk or a kill can cut the last line short)."""
    if not path.exists():
        return [], 0
    kept, dropped = [], 0
    for ln in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            d = json.loads(ln)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(d, dict):
            kept.append(d)
        else:
            dropped += 1
    return kept, dropped


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only lines up to ``step``: a killed run may have logged past its last checkpoint.
    Partial lines are dropped, saying so."""
    if not path.exists():
        return
    lines, dropped = read_metrics(path)
    if dropped:
        print(
            f"peftlab: {path}: dropped {dropped} incomplete line(s) (a write cut short, e.g. by "
            f"a full disk); the {len(lines)} complete ones are kept",
            file=sys.stderr,
        )
    kept = [d for d in lines if d.get("step", 0) <= step] if step else []
    atomic_write(path, "".join(json.dumps(d) + "\n" for d in kept))


def first_eval(path: Path) -> dict | None:
    for d in read_metrics(path)[0]:
        if d.get("step") == 0 and "eval_loss" in d:
            return {k: v for k, v in d.items() if k.startswith("eval_")}
    return None


def atomic_write(path: Path, text: str) -> None:
    """:func:`peftlab.core.fileio.atomic_write`, with a full disk's error naming the space."""
    try:
        _atomic_write(path, text)
    except OSError as e:
        raise write_error(path, e, len(text.encode())) from e


def log(accelerator, out: Path, line: dict, tensorboard: bool) -> None:
    if accelerator.is_main_process:
        path = out / "metrics.jsonl"
        try:
            _append(path, json.dumps(line) + "\n")
        except OSError as e:  # a partial line may remain: read_metrics drops it on resume
            raise write_error(path, e, None, out) from e
    if tensorboard:
        accelerator.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def save_adapter(model, dest: Path) -> None:
    """Write the adapter next to ``dest`` and swap it in, so a crash never leaves half of one."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peftlab.save_adapter(model, tmp)
    except Exception as e:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        raise write_error(dest, e, needed, dest.parent) from e
    replace_dir(tmp, dest)  # an existing adapter waits as adapter.old until tmp is in place


def clean_leftovers(out: Path) -> None:
    """Remove the temporary files and directories a killed run left, and put back an adapter
    that a kill between :func:`save_adapter`'s two renames left as ``adapter.old``."""
    adapter, old = out / "adapter", out / "adapter.old"
    if old.is_dir() and not adapter.exists():
        os.replace(old, adapter)
    for p in [old, *out.glob("*.tmp"), *out.glob("checkpoints/*.tmp")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_error(path: Path, e: BaseException, needed: int | None = None, resume=None) -> OSError:
    """One line naming ``path`` and what went wrong; for a full disk the space free and
    (about) needed, and the command that continues the run once space is freed."""
    code = getattr(e, "errno", None)
    full = code == errno.ENOSPC or "No space left" in str(e)
    free = _free_bytes(Path(path))
    if not full and needed and free is not None and free < needed:
        full = True  # torch.save reports a full disk as "unexpected pos ..."
    if full:
        code = errno.ENOSPC
        reason = f"no space left on device ({_size(free)} free" + (
            f", about {_size(needed)} needed)" if needed else ")"
        )
    else:
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        reason = f"{type(e).__name__}: {reason}" if not isinstance(e, OSError) else reason
    msg = f"could not write {path}: {reason}"
    if resume is not None:
        fix = "free space" if full else "fix that"
        msg += f"; {fix} and continue with `peftlab train --resume {resume}`"
    return OSError(code or errno.EIO, msg)


def _free_bytes(path: Path) -> int | None:
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "? bytes"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
