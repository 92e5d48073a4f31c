"""(IA)³: learned rescaling of inner activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638).

Three learned vectors per transformer block rescale the keys, the values and the feed-forward
activations elementwise (paper §3.3):

    k = l_k ⊙ (W_k·x),   v = l_v ⊙ (W_v·x),   h = W_down·(l_ff ⊙ act(W_up·x))

In general, a targeted linear layer scales its output, ``y = l ⊙ (W·x + b)`` with ``l ∈ R^out``;
a *feed-forward* layer (``feedforward_modules``) scales its input, ``y = W·(l ⊙ x) + b`` with
``l ∈ R^in``. The vectors start at one, so the model is unchanged at init. Both fold into the
weight (``merge``), and ``unmerge`` divides them out again:

    output:  W' = diag(l)·W,   b' = l ⊙ b          input:  W' = W·diag(l),   b' = b

An entry of ``l`` at (or near) zero cannot be divided back out: ``merge`` keeps the weight rows
(columns) such entries scale and ``unmerge`` restores them, so merging is always reversible.

``target_modules=None`` takes peft's per-architecture defaults (:data:`DEFAULTS`): keys, values
and the FFN's down projection on Llama, ``c_attn`` and ``mlp.c_proj`` on GPT-2, ``key``,
``value`` and ``output.dense`` on BERT; for other architectures the same layers are read from
the model's blocks (``_ia3_defaults``). Vectors are ``ia3_l[name]`` of shape ``(out, 1)`` or
``(1, in)``, as peft's, so adapter files are interchangeable with peft's ``IA3`` type.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig, check
from peftlab.core.matching import (
    ALL_LINEAR,
    find_targets,
    matches_target,
    set_submodule,
)
from peftlab.core.model import check_free
from peftlab.core.registry import MethodSpec, Tuning, register_method
from peftlab.core.state import adapter_configs
from peftlab.core.weights import dense_weight, features, is_quantized
from peftlab.core.wrapper import BaseLayerAttributes
from peftlab.methods._ia3_defaults import DEFAULTS, default_modules  # noqa: F401 - DEFAULTS re-exported

IA3_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
"""Learning rates searched for IA³: its vectors want rates ~3-10× a low-rank adapter's (the
paper trains at 3e-3 with Adafactor, §3.5; peft's benchmark at 5e-3)."""


def _is_list(spec: object) -> bool:
    return isinstance(spec, list | tuple)


def _check_regex(key: str, spec: str) -> None:
    try:
        re.compile(spec)
    except re.error as e:
        raise ConfigError(f"{key}={spec!r} is not a valid regex: {e}") from None


@dataclasses.dataclass(frozen=True)
class IA3Config(MethodConfig):
    """Learned vectors that rescale the outputs (or, for feed-forward layers, the inputs) of the
    targeted linear layers."""

    mergeable = True

    target_modules: str | list[str] | None = None
    """Layers that get a vector: names/suffixes, a regex, or "all-linear". None: the
    architecture's default as in peft (Llama: k_proj, v_proj, down_proj; GPT-2: c_attn,
    mlp.c_proj; BERT: key, value, output.dense)."""
    feedforward_modules: str | list[str] | None = None
    """Targets whose input is scaled instead of their output (the paper's l_ff): names/suffixes
    or a regex; a list must be a subset of a target_modules list. None: the architecture's
    default (down_proj, mlp.c_proj, output.dense) among the targets; [] none."""
    init_ia3_weights: bool = True
    """Start every vector at one (the model unchanged at init); false draws them from N(0, 1)
    as peft does (for tests only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("target_modules", "feedforward_modules"):
            spec = getattr(self, key)
            if isinstance(spec, str):
                check(spec != "", key, spec, 'a module name list, a regex, or "all-linear"')
                if spec != ALL_LINEAR:
                    _check_regex(key, spec)
        check(
            self.target_modules is None or len(self.target_modules) > 0,
            "target_modules",
            self.target_modules,
            'None (the architecture\'s default), a module name list, a regex, or "all-linear"',
        )
        if _is_list(self.target_modules) and _is_list(self.feedforward_modules):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            check(
                not extra,
                "feedforward_modules",
                list(self.feedforward_modules),
                f"a subset of target_modules {list(self.target_modules)} ({extra} are not in it)",
            )


def resolve_modules(
    config: IA3Config, model_type: str | None, model: nn.Module | None = None
) -> tuple[object, object]:
    """``(target_modules, feedforward_modules)`` with None replaced by the defaults.

    A default feed-forward spec keeps, of a target list, the entries that name a default
    feed-forward layer (``"mlp.down_proj"`` does on Llama; ``"q_proj"`` does not), so it is a
    subset of the list as peft requires; beside a regex or "all-linear" it is used as is.

    Raises:
        ConfigError: no default for ``model_type``, or a feed-forward list that is not a
            subset of the default target list.
    """
    targets = config.target_modules
    if targets is None:
        targets = default_modules(model_type, "target_modules", model)[0]
    feedforward = config.feedforward_modules
    if feedforward is None:
        ff = default_modules(model_type, "feedforward_modules", model)[1]
        feedforward = [t for t in targets if matches_target(t, ff)] if _is_list(targets) else ff
    elif _is_list(targets) and _is_list(feedforward):
        extra = [m for m in feedforward if m not in targets]
        check(
            not extra,
            "feedforward_modules",
            list(feedforward),
            f"a subset of the target modules {list(targets)} ({extra} are not among them)",
        )
    return (
        list(targets) if _is_list(targets) else targets,
        list(feedforward) if _is_list(feedforward) else feedforward,
    )


def feedforward_names(targets: Sequence[str], feedforward: object, explicit: bool) -> set[str]:
    """The targeted layers (qualified names) whose input is scaled. Reads names only, so the
    memory estimator runs it too.

    Raises:
        ConfigError: with ``explicit`` (the user's ``feedforward_modules``), an entry or regex
            that matches none of ``targets``.
    """
    specs = [feedforward] if isinstance(feedforward, str) else [[e] for e in feedforward]
    out: set[str] = set()
    for spec in specs:
        hits = {t for t in targets if matches_target(t, spec)}
        if explicit and not hits:
            entry = spec if isinstance(spec, str) else spec[0]
            layers = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
            raise ConfigError(
                f"feedforward_modules entry {entry!r} matches none of the targeted layers "
                f"({layers}); a feed-forward module must be one of the target modules"
            )
        out |= hits
    return out


class IA3Linear(BaseLayerAttributes, nn.Module):
    """A linear layer (``nn.Linear`` or ``Conv1D``) whose output — for a feed-forward layer, its
    input — is rescaled elementwise by a learned vector per adapter.

    The base layer is wrapped, never copied. Adapter ``name`` owns ``ia3_l[name]``: ``(out, 1)``
    scaling the output or ``(1, in)`` scaling the input (peft's shapes).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def add_adapter(self, name: str, feedforward: bool, init_ones: bool = True) -> None:
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        make = torch.ones if init_ones else torch.randn
        self.ia3_l[name] = nn.Parameter(make(shape, device=w.device, dtype=dtype))
        self.feedforward[name] = feedforward

    def set_adapter(self, names: list[str]) -> None:
        if self.merged:
            self.unmerge()
        self.active = [n for n in names if n in self.ia3_l]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``; ``l`` broadcasts over the leading dims."""
        if self.disabled or self.merged or not self.active:
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        for name in self.active:
            if self.feedforward[name]:
                x = (x * self.ia3_l[name].view(-1)).to(dtype)  # (..., in)
        y = self.base_layer(x, *args, **kwargs)
        dtype = y.dtype
        for name in self.active:
            if not self.feedforward[name]:
                y = (y * self.ia3_l[name].view(-1)).to(dtype)  # (..., out)
        return y

    @torch.no_grad()
    def _rescale(self, name: str, inverse: bool) -> None:
        """Multiply the base weight (on the output side, the bias too) by ``l``, or divide it
        back out, in place. Merging keeps the slices that entries with ``|l| < √tiny`` scale
        (they cannot be divided back exactly); unmerging restores them."""
        vec = self.ia3_l[name].detach().flatten()
        w = dense_weight(self.base_layer)  # [out, in], a view of the stored weight
        out = not self.feedforward[name]
        bias = getattr(self.base_layer, "bias", None) if out else None
        if not inverse:
            small = vec.abs() < torch.finfo(vec.dtype).tiny ** 0.5
            rows = w[small] if out else w[:, small]
            self._kept[name] = (small, rows.clone(), None if bias is None else bias[small].clone())
            w.mul_(vec[:, None] if out else vec[None, :])
            if bias is not None:
                bias.mul_(vec)
            return
        small, rows, kept_bias = self._kept.pop(name)
        safe = torch.where(small, torch.ones_like(vec), vec)
        w.div_(safe[:, None] if out else safe[None, :])
        if bias is not None:
            bias.div_(safe)
        if bool(small.any()):
            if out:
                w[small] = rows
            else:
                w[:, small] = rows
            if bias is not None:
                bias[small] = kept_bias

    @torch.no_grad()
    def merge(self) -> None:
        if self.disabled:
            return
        for name in self.active:
            if name not in self.merged:
                self._rescale(name, inverse=False)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self._rescale(self.merged.pop(), inverse=True)

    def unload(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self.merge()
        else:
            self.unmerge()
        self._kept.clear()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.ia3_l)}"


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _apply(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    targets_spec, ff_spec = resolve_modules(config, _model_type(model), model)
    targets = find_targets(model, targets_spec)
    feedforward = feedforward_names(targets, ff_spec, config.feedforward_modules is not None)
    for name in targets:
        module = model.get_submodule(name)
        check_free(name, module, IA3Linear)
        if not isinstance(module, IA3Linear) and is_quantized(module):
            raise ConfigError(
                f"target_modules: {name} is a 4-bit layer; IA³ needs a 16/32-bit base (for a "
                f"4-bit base use method 'qlora')"
            )
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, IA3Linear):
            module = IA3Linear(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, name in feedforward, config.init_ia3_weights)


def _export(model: nn.Module, adapter_name: str) -> tuple[MethodConfig, dict]:
    """The config with the defaults written out (so peft, which reads lists, applies the same
    layers), and the vectors."""
    config = adapter_configs(model)[adapter_name]
    targets, feedforward = resolve_modules(config, _model_type(model), model)
    config = config.replace(target_modules=targets, feedforward_modules=feedforward)
    return config, {n: p for n, p in model.named_parameters() if ".ia3_l." in n}


def peft_ia3_fields(config: IA3Config) -> dict:
    """Fields of peft's IA3Config for ``adapter_config.json``."""
    return {
        "peft_type": "IA3",
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "init_ia3_weights": config.init_ia3_weights,
        "fan_in_fan_out": False,
        "modules_to_save": config.modules_to_save,
        "task_type": None,
        "inference_mode": True,
    }


register_method(
    MethodSpec(
        "ia3",
        IA3Config,
        _apply,
        "ia3_",
        peft_export=peft_ia3_fields,
        export=_export,
        tuning=Tuning(3e-3, {"lr": IA3_LRS}),
    )
)
