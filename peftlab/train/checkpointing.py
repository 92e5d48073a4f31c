"""Activation checkpointing per decoder layer, chosen layer by layer, with optional CPU offload.

A checkpointed layer keeps only its inputs for backward and recomputes its forward there
(``torch.utils.checkpoint``, non-reentrant, RNG state preserved, so dropout — LoRA's included —
draws the same masks and the gradients are exactly those of the plain run). For a stack of L
layers, checkpointing a set S of them stores

    activations ≈ Σ_{l ∉ S} A_l + Σ_{l ∈ S} x_l + max_{l ∈ S} A_l

(A_l: what layer l saves for backward, x_l: its input, the last term the one layer being
recomputed), at the cost of one extra forward of the layers in S. ``every: k`` checkpoints
layers 0, k, 2k, …: about 1/k of the recompute for about 1/k of the savings.

With ``offload`` the checkpointed inputs x_l are moved to pinned CPU memory during the forward
and brought back for the recompute (``torch.autograd.graph.save_on_cpu``), leaving on the GPU
only the layer being worked on. On a CPU-only run the inputs already live on the CPU, so
offloading is a no-op.

The wrapping is peftlab's own (not transformers' ``gradient_checkpointing_enable``): each chosen
layer's ``forward`` becomes a checkpointed call of the original, so module hooks (and with them
the virtual-token methods' hooks on the transformer body) stay outside the recompute, and the
adapters inside a layer are recomputed with it. As in transformers, a checkpointed layer gets no
KV cache to write (a replay would write it twice) unless it says it only reads one
(``_can_checkpoint_with_cache``, which prefix tuning sets for its read-only prefix cache).

Config (``gradient_checkpointing`` in the training config)::

    false                         # off
    true                          # every layer
    {every: 2}                    # layers 0, 2, 4, ...
    [0, 1, 2, 3]                  # these layers (0-based)
    {every: 1, offload: true}     # every layer, inputs offloaded to the CPU (GPU only)
    {layers: [0, 1], offload: true}
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab.core.config import ConfigError, check

KEY = "gradient_checkpointing"
ALLOWED = (
    "false, true (every layer), [layer indices], or a mapping {every: k} / {layers: [i, ...]} "
    "with an optional offload: true|false"
)
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """Which decoder layers to checkpoint, and whether to offload their inputs."""

    every: int = 1
    """Checkpoint layers 0, every, 2·every, … (ignored when ``layers`` is given)."""
    layers: tuple[int, ...] | None = None
    """Exactly these layers (0-based)."""
    offload: bool = False
    """Keep the checkpointed inputs in pinned CPU memory until backward (GPU only)."""

    @classmethod
    def from_spec(cls, spec) -> CheckpointPlan | None:
        """The plan a config value describes, or None for "off"; errors name the key."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, list | tuple):
            return cls(layers=_indices(spec, spec))
        check(
            isinstance(spec, dict), KEY, spec, f"{ALLOWED.rstrip('.')}, not {type(spec).__name__}"
        )
        unknown = sorted(set(spec) - {"every", "layers", "offload"})
        check(not unknown, KEY, spec, f"{ALLOWED}; unknown key(s) {unknown}")
        check(
            not {"every", "layers"} <= set(spec),
            KEY,
            spec,
            "a mapping with every or layers, not both",
        )
        every = spec.get("every", 1)
        check(
            isinstance(every, int) and not isinstance(every, bool) and every > 0,
            KEY,
            spec,
            "a mapping whose every is a positive integer",
        )
        offload = spec.get("offload", False)
        check(isinstance(offload, bool), KEY, spec, "a mapping whose offload is true or false")
        layers = spec.get("layers")
        return cls(every, _indices(layers, spec) if layers is not None else None, offload)

    def indices(self, num_layers: int) -> list[int]:
        """The chosen layer indices for a stack of ``num_layers``."""
        if self.layers is None:
            return list(range(0, num_layers, self.every))
        bad = [i for i in self.layers if i >= num_layers]
        check(not bad, KEY, list(self.layers), f"layer indices below {num_layers} (got {bad})")
        return sorted(set(self.layers))


def _indices(values, spec) -> tuple[int, ...]:
    ok = isinstance(values, list | tuple) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values
    )
    check(ok, KEY, spec, "a list of non-negative layer indices, e.g. [0, 2, 4]")
    return tuple(values)


def check_spec(spec) -> None:
    """Validate a ``gradient_checkpointing`` config value (raises ConfigError)."""
    CheckpointPlan.from_spec(spec)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, in order.

    Those of transformers' ``GradientCheckpointingLayer`` kind (every modern model), else the
    largest ``nn.ModuleList`` of modules of one type.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
    ]
    marked = [m for m in stacks if isinstance(m[0], GradientCheckpointingLayer)]
    if marked:
        return [layer for stack in marked for layer in stack]
    if not stacks:
        raise ConfigError(
            f"{KEY}: {type(model).__name__} has no stack of repeated layers (nn.ModuleList) to "
            f"checkpoint"
        )
    return list(max(stacks, key=lambda s: sum(p.numel() for p in s.parameters())))


def enable(model: nn.Module, spec) -> list[int]:
    """Checkpoint the layers ``spec`` chooses (a config value, see the module docstring);
    returns their indices. Replaces any earlier :func:`enable`. Layers that transformers'
    own checkpointing already covers are left to it."""
    disable(model)
    plan = CheckpointPlan.from_spec(spec)
    if plan is None:
        return []
    layers = decoder_layers(model)
    chosen = plan.indices(len(layers))
    for i in chosen:
        layer = layers[i]
        if getattr(layer, "gradient_checkpointing", False):
            continue
        layer.forward = _Checkpointed(layer, layer.__dict__.get("forward"), plan.offload)
    return chosen


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`."""
    for m in model.modules():
        wrapper = m.__dict__.get("forward")
        if isinstance(wrapper, _Checkpointed):
            del m.__dict__["forward"]
            if wrapper.inner is not None:
                m.forward = wrapper.inner


def enabled_layers(model: nn.Module) -> list[int]:
    """Indices (in :func:`decoder_layers`) of the layers :func:`enable` checkpointed."""
    try:
        layers = decoder_layers(model)
    except ConfigError:
        return []
    return [i for i, m in enumerate(layers) if isinstance(m.__dict__.get("forward"), _Checkpointed)]


class _Checkpointed:
    """A layer's ``forward`` that checkpoints the original while training with gradients."""

    def __init__(self, layer: nn.Module, inner, offload: bool) -> None:
        self.layer = layer
        self.inner = inner  # an instance-level forward found there (accelerate hooks), or None
        self.offload = offload
        params = list(inspect.signature(inner or layer.forward).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        # GPT2Block takes its cache positionally
        self.cache_slots = {
            i for i, p in enumerate(params) if p.name in _CACHE_ARGS and p.kind in positional
        }

    def __call__(self, *args, **kwargs):
        layer = self.layer
        forward = self.inner or functools.partial(type(layer).forward, layer)
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if not getattr(layer, "_can_checkpoint_with_cache", False):
            args = tuple(None if i in self.cache_slots else v for i, v in enumerate(args))
            kwargs = {k: (None if k in _CACHE_ARGS else v) for k, v in kwargs.items()}
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
        with offload_context(self.offload, _device(args, kwargs)):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _device(args, kwargs) -> torch.device | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def offload_context(offload: bool, device: torch.device | None):
    """``save_on_cpu`` around a checkpointed call on an accelerator; nothing on the CPU."""
    if not offload or device is None or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)
