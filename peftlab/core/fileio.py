"""Atomic writes: a reader (or a resumed run) sees the whole old file or the whole new one.

A file is written to a fresh temporary name in its own directory (same filesystem, so the
rename cannot turn into a copy), flushed to disk with ``fsync`` and renamed over the final name
with ``os.replace``, which POSIX makes atomic. If anything fails on the way (a full disk,
``ENOSPC``, included) the temporary file is removed, the old file is left as it was, and the
error is one line naming the path. A directory (an adapter, a checkpoint) is built under a
temporary name by the caller and swapped in by :func:`replace_dir` the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path.

    Raises:
        OSError: the write failed; the message names ``path``, the old file is unchanged.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values through ``str``) atomically."""
    # Serialised before the temporary file exists: a value JSON cannot take leaves nothing.
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` create the file at ``tmp``, then move it to ``path`` atomically.

    For writers that want a path rather than bytes (e.g. ``safetensors.torch.save_file``).

    Raises:
        OSError: the write, fsync or rename failed; the message names ``path``, the temporary
            file is gone and the old file is unchanged. Any other exception from ``write``
            propagates as it is, after the same clean-up.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _reserve_temp(path)
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    return path


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike, *, replace: bool = True) -> bool:
    """Make the finished directory ``tmp`` appear as ``dest`` in one rename.

    Every file under ``tmp`` is fsynced first, so ``dest`` never shows a file that a crash
    could still lose. With ``replace`` an existing ``dest`` is moved aside to ``<dest>.old``
    and removed once ``tmp`` is in place; without it the first directory to arrive wins and
    ``tmp`` is removed (e.g. two processes filling the same cache).

    Returns:
        Whether ``tmp`` became ``dest``.

    Raises:
        OSError: the fsync or a rename failed; the message names ``dest``, ``tmp`` is removed
            and an existing ``dest`` is back in place.
    """
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(dest.name + ".old")
    try:
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
        if not replace:
            return _rename_unless_there(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old.exists() and not dest.exists():
                os.replace(old, dest)
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(dest, e) from e
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
    return True


def _rename_unless_there(tmp: Path, dest: Path) -> bool:
    try:
        os.rename(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        return False
    _fsync_dir(dest.parent)
    return True


def _write_error(path: Path, e: OSError) -> OSError:
    """One line naming ``path``; OSError(errno, msg) comes back as the errno's subclass
    (FileNotFoundError, ...), so callers that catch those still do."""
    msg = f"could not write {path}: {e.strerror or e}; the old file, if any, is unchanged"
    return OSError(e.errno, msg) if e.errno is not None else OSError(msg)


def _reserve_temp(path: Path) -> Path:
    """A new, empty file beside ``path`` that no other writer uses (created with O_EXCL, so
    two processes or threads writing the same file never share one; mode from the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort, as some filesystems cannot fsync a directory."""
    with contextlib.suppress(OSError):
        _fsync(directory)


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
