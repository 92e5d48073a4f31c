"""Undo for the operations that change a model's structure (``apply``, ``load_adapter``).

A refused apply or load must leave the model exactly as it was, whatever the method had done
by the time it failed: layers wrapped, modules added, hooks registered, flags set, classes
swapped (bitsandbytes layers adopted), parameters upcast (QLoRA's k-bit preparation).

All of that is state held in the ``__dict__`` of the model's modules (``_modules``,
``_parameters``, ``_buffers``, the hook dicts, ``training``, plain attributes), their classes,
and the tensors' ``requires_grad``, dtype and device. :class:`ModelSnapshot` records those for
every module reachable from the model — one level deep: the attribute dict and the contents
of every dict, list or set in it, not the tensors' values — and :meth:`ModelSnapshot.restore`
puts them back in place (the same container objects, so hook handles keep working).

Tensor values are not copied (that would double the model's memory); a cast is undone by
casting back, which is exact for the upcasts and moves methods make. Writing new values into
existing weights is therefore left to the very end of an operation, after everything that can
refuse has run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _contents(value: Any) -> list | None:
    """A shallow copy of a container's contents (None for anything else)."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list | set):
        return list(value)
    return None


def _refill(container: Any, contents: list) -> None:
    """Put ``contents`` back into ``container`` in place."""
    if isinstance(container, dict):
        container.clear()
        container.update(contents)
    elif isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


class _ObjectState:
    """One object's class, attribute dict and the contents of the containers in it."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.cls = type(obj)
        self.attrs = dict(obj.__dict__)
        self.contents = {k: c for k, v in self.attrs.items() if (c := _contents(v)) is not None}

    def restore(self) -> None:
        if type(self.obj) is not self.cls:
            self.obj.__class__ = self.cls
        self.obj.__dict__.clear()
        self.obj.__dict__.update(self.attrs)
        for key, contents in self.contents.items():
            _refill(self.attrs[key], contents)


class ModelSnapshot:
    """The structure of ``model`` now, to put back with :meth:`restore`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = list(model.modules())
        self.module_ids = {id(m) for m in modules}
        self.objects = [_ObjectState(m) for m in modules]
        # Model configs (transformers' PretrainedConfig) are plain objects the methods may set
        # flags on (gradient checkpointing turns use_cache off).
        configs = {id(c): c for m in modules if _is_plain(c := getattr(m, "config", None))}
        self.objects += [_ObjectState(c) for c in configs.values()]
        tensors = {
            id(t): t for m in modules for t in (*m._parameters.values(), *m._buffers.values())
        }
        self.tensors = [
            (t, t.requires_grad, t.dtype, t.device) for t in tensors.values() if t is not None
        ]

    def is_new(self, module: nn.Module) -> bool:
        """Whether ``module`` was not part of the model when the snapshot was taken."""
        return id(module) not in self.module_ids

    @torch.no_grad()
    def restore(self) -> None:
        """Put every recorded module, config and tensor flag back as it was."""
        for obj in self.objects:
            obj.restore()
        for t, requires_grad, dtype, device in self.tensors:
            if t.dtype != dtype or t.device != device:
                t.data = t.data.to(device=device, dtype=dtype)
            if t.requires_grad != requires_grad and t.is_leaf:
                t.requires_grad_(requires_grad)


def _is_plain(obj: Any) -> bool:
    return obj is not None and not isinstance(obj, nn.Module) and hasattr(obj, "__dict__")


@contextlib.contextmanager
def atomic(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Run the block; if it raises, put ``model`` back as it was before it and re-raise."""
    snapshot = ModelSnapshot(model)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
