"""One writer per run directory: the lock file ``<output_dir>/.peftlab.lock``.

The lock is a small JSON file (pid, host, process start time, when) created with ``O_EXCL``,
so of two runs that start together exactly one creates it. It is held from before the run
directory is examined until :func:`train` returns or raises, and removed then. A second
``peftlab train`` on the same directory (a fresh run with ``overwrite=true`` or a resume) gets
a one-line :class:`RunDirLocked` naming the holder.

A lock whose holder is gone (its pid is not running on this host, or is running but started
after the lock was taken: a reused pid) is stale, left by a killed run: it is taken over,
saying so. A lock from another host cannot be checked and is respected; the message says
which file to delete if that run is gone. Under ``torchrun`` only the main process takes the
lock and tells the others whether it got it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path

from peftlab.core.config import ConfigError
from peftlab.train.rundir import LOCK_FILE


class RunDirLocked(FileExistsError):
    """Another peftlab run holds the run directory's lock."""


class _Lock:
    def __init__(self, path: Path, record: dict, made: list[Path]):
        self.path, self.record, self.made = path, record, made

    def release(self) -> None:
        if _read(self.path) == self.record:  # never remove a lock that is not ours
            self.path.unlink(missing_ok=True)
        for d in self.made:  # a run refused before writing anything leaves no empty dirs
            with contextlib.suppress(OSError):
                d.rmdir()


_held: list[_Lock] = []  # the locks this process holds, newest last


def acquire(accelerator, out: Path) -> None:
    """Take ``out``'s lock (creating ``out``) on the main process; every process raises if
    it is held. Released by :func:`releasing` when :func:`train` exits."""
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            _held.append(_take(Path(out)))
        except (ConfigError, OSError) as e:  # OSError: an unwritable directory, say
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        msg = [str(error) if error else None]
        broadcast_object_list(msg, from_process=0)
        if msg[0] and error is None:
            error = RunDirLocked(msg[0])
    if error is not None:
        raise error


def releasing(fn):
    """Decorator: the locks ``fn`` takes are released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_held) > mark:
                _held.pop().release()

    return wrapper


def _take(out: Path) -> _Lock:
    made = [d for d in [out, *out.parents] if not d.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        if out.is_file():
            raise ConfigError(f"output_dir={str(out)!r} is a file, not a directory") from None
        parent = next((p for p in out.parents if p.is_file()), out.parent)
        raise ConfigError(
            f"output_dir={str(out)!r}: Not a directory: its parent {parent} is a file"
        ) from None
    path = out / LOCK_FILE
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_started": _started(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if _alive(path, holder):
                raise _locked(out, path, holder) from None
            if _break(path, holder):
                who = f"pid {holder['pid']} on {holder['host']}" if holder else "an unknown run"
                print(
                    f"peftlab: {path} was left by {who}, which is no longer running; taking "
                    f"the run directory over",
                    file=sys.stderr,
                )
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return _Lock(path, record, made)
    raise RunDirLocked(f"could not take the lock {path}: other runs keep taking it")


def _locked(out: Path, path: Path, holder: dict | None) -> RunDirLocked:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
        if holder
        else "a run that is starting"
    )
    return RunDirLocked(
        f"{out} is in use by another peftlab run ({who}); wait for it to finish or stop it. "
        f"If that run is gone, delete {path}"
    )


def _read(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _alive(path: Path, holder: dict | None) -> bool:
    """Whether the lock's holder may still be running."""
    if holder is None:
        # Unreadable: being written this very moment (alive), or a run killed between create
        # and write (stale once it is a few seconds old).
        try:
            return time.time() - path.stat().st_mtime < 5
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return True  # another machine's pids cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():  # this process: held only if train() is running here now
        return any(lk.path == path for lk in _held)
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:
        return True  # running, but not ours to inspect
    recorded = holder.get("process_started")
    # A different start time means the pid was reused by an unrelated process.
    return not isinstance(recorded, int | float) or abs(started - recorded) < 1.0


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if unknown."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _break(path: Path, holder: dict | None) -> bool:
    """Remove the stale lock ``holder``, unless another process got there first."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)  # atomic: of two processes breaking it, one moves it
    except FileNotFoundError:
        return False
    if _read(aside) != holder:  # a fresh lock was taken in between: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
