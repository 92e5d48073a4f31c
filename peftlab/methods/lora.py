"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W0·x + s·B·A·x,   A ∈ R^{r×in}, B ∈ R^{out×r},   s = alpha / r   (rsLoRA: alpha / √r)

A starts Kaiming-uniform (a=√5) and B at zero, so the model is unchanged at init. The update
folds exactly into W0 for inference (``merge``), and several named adapters can live on one
layer with one of them active.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from peftlab.core.config import MethodConfig, check
from peftlab.core.matching import find_targets, set_submodule
from peftlab.core.registry import MethodProfile, MethodSpec, register_method
from peftlab.core.weights import dense_weight, features, is_quantized, write_dense_weight


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Low-rank adaptation of the targeted linear layers."""

    mergeable = True

    r: int = 8
    """Rank of the update B·A; higher trains more parameters and adds capacity."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (alpha / √r with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank path, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Module names/suffixes, a regex, or "all-linear" (every linear layer but the output head)."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / √r (Kalajdzievski 2023), so larger ranks keep learning."""
    init: str = "kaiming"
    """Init of A: "kaiming" (uniform, a=√5, as the LoRA reference code) or "gaussian" (N(0, 1/r)).
    B always starts at zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.r, int) and self.r > 0, "r", self.r, "a positive integer, e.g. 8")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number, e.g. 2·r")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1), e.g. 0.05")
        check(self.init in ("kaiming", "gaussian"), "init", self.init, '"kaiming" or "gaussian"')
        check(
            isinstance(self.target_modules, str | list | tuple) and len(self.target_modules) > 0,
            "target_modules",
            self.target_modules,
            'a module name list, a regex, or "all-linear"',
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _lora_matmul(x, w0, bias, A, B, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ, x·Aᵀ)`` with ``x`` flattened to ``(N, in)``: three BLAS
    calls, the update added in place into the base output."""
    x2 = x.reshape(-1, x.shape[-1])
    ax = nn.functional.linear(x2, A)  # (N, r)
    y = nn.functional.linear(x2, w0, bias)
    return y.addmm_(ax, B.t(), alpha=s), ax


class _LoRAMatmul(torch.autograd.Function):
    """``x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ`` for a frozen dense ``W0`` (``[out, in]``), as one autograd node.

    Autograd's own graph for the same sum has six nodes per layer, adds the two input
    gradients (W0's and A's paths) in a separate pass and leaves B's gradient transposed.
    Here the forward is one ``addmm`` into the base output, and the backward is four matmuls
    and one in-place ``addmm_``: ∂x = g·W0 + (s·g·B)·A, ∂A = (s·g·B)ᵀ·x, ∂B = s·gᵀ·(x·Aᵀ).
    Saved for backward: x (which A's gradient needs anyway) and x·Aᵀ (``(N, r)``).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A, B, s):
        y, ax = _lora_matmul(x, w0, bias, A, B, s)
        ctx.save_for_backward(x, w0, A, B, ax)
        ctx.s = s
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, w0, A, B, ax = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        g = gy.reshape(-1, gy.shape[-1])
        gx = gA = gB = None
        if need_B:
            gB = (g.t() @ ax).mul_(ctx.s)  # (out, r)
        if need_x or need_A:
            gax = (g @ B).mul_(ctx.s)  # (N, r)
            if need_A:
                gA = gax.t() @ x.reshape(-1, x.shape[-1])  # (r, in)
            if need_x:
                gx = (g @ w0).addmm_(gax, A).view(x.shape)
        return gx, None, None, gA, gB, None


# torch's registries of global module hooks (dicts filled in place, never rebound)
_GLOBAL_HOOKS = nn.modules.module._global_forward_hooks
_GLOBAL_PRE_HOOKS = nn.modules.module._global_forward_pre_hooks


def plain_linear(layer: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight may be read directly instead of calling the module: no
    hooks and no replaced ``forward`` (accelerate's offloading hooks swap the weight in there)."""
    return (
        type(layer) is nn.Linear
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and "forward" not in layer.__dict__
        and not _GLOBAL_HOOKS
        and not _GLOBAL_PRE_HOOKS
    )


_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_FUSED, _BASE = "fused", "base"
"""Kinds of a layer's cached plan: the one active adapter through :class:`_LoRAMatmul`, or
the base layer alone (adapters disabled, merged or none active)."""


class LoRALinear(nn.Module):
    """A linear layer (``nn.Linear``, ``Conv1D`` or a 4-bit ``Linear4bit``) plus LoRA adapters.

    The base layer is wrapped, never copied. Adapter ``name`` owns ``lora_A[name]``
    (``[r, in]``), ``lora_B[name]`` (``[out, r]``) and a scaling factor.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._plan: tuple | None = None
        """Cached for the hot path: ``(_FUSED, base, A module, B module, scaling, device type)``
        when the one active adapter may take the fused path, ``(_BASE, base)`` when the output
        is the base layer's alone, else ``()``; rebuilt (``None``) whenever adapters, merging,
        disabling, train/eval mode or device/dtype change."""
        self.disabled = False

    @property
    def disabled(self) -> bool:
        """Adapters switched off (``peftlab.disable_adapters``): the base layer's output only."""
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disabled = bool(value)
        self._plan = None

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.lora_A[name] = nn.Linear(
            self.in_features, config.r, bias=False, device=w.device, dtype=dtype
        )
        self.lora_B[name] = nn.Linear(
            config.r, self.out_features, bias=False, device=w.device, dtype=dtype
        )
        self.lora_dropout[name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        self.scaling[name] = config.scaling
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
        nn.init.zeros_(self.lora_B[name].weight)
        self._plan = None

    def train(self, mode: bool = True):
        self._plan = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._plan = None
        return super()._apply(fn, *args, **kwargs)

    def set_adapter(self, names: list[str]) -> None:
        if self.merged:
            self.unmerge()
        self.active = [n for n in names if n in self.lora_A]
        self._plan = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A as ``[out, in]``."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``."""
        y = self.base_only(x)
        if y is not None:
            return y
        fused = self.fused_forward(x)
        if fused is not None:
            return fused
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        for name in self.active:
            result = self.add_update(result, x, name)
        return result

    def _make_plan(self) -> tuple:
        base = self.base_layer
        if type(base) is not nn.Linear:
            return ()
        if self.disabled or self.merged or not self.active:
            return _BASE, base
        if len(self.active) != 1:
            return ()
        name = self.active[0]
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            return ()  # dropout(x) feeds the update only: autograd's graph
        return (
            _FUSED,
            base,
            self.lora_A[name],
            self.lora_B[name],
            self.scaling[name],
            base.weight.device.type,
        )

    def _usable_plan(self, kind: str) -> tuple | None:
        """The cached plan if it is of ``kind`` and its base layer may still be read directly:
        the layer's current base (QLoRA's merge swaps it) with no hooks added since."""
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan()
        if not plan or plan[0] is not kind:
            return None
        base = plan[1]
        if base is not self._modules["base_layer"] or not plain_linear(base):
            return None
        return plan

    def base_only(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base layer's output through ``F.linear``, without a second module call, when
        the adapters take no part (disabled, merged, none active) and the base is a plain
        ``nn.Linear`` without hooks; else ``None``. Merged inference pays one module call
        per layer, as the bare model does."""
        plan = self._usable_plan(_BASE)
        if plan is None:
            return None
        base = plan[1]
        return nn.functional.linear(x, base._parameters["weight"], base._parameters["bias"])

    def fused_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor | None:
        """``W0·x (+ b) + s·B·A·x`` for the one active adapter through :class:`_LoRAMatmul`
        (or, without autograd, the same three matmuls), or ``None`` where that does not
        apply: several or no active adapters, merged, a 4-bit or hooked base, a trainable
        base weight or bias, dropout in training, or dtypes that differ. Under autocast the
        operands are cast to its dtype first, as autocast does for ``F.linear``, and the
        node runs in that dtype (gradients reach A and B through the casts in their own
        dtype). The static part of that test is cached."""
        plan = self._usable_plan(_FUSED)
        if plan is None:
            return None
        _, base, a_mod, b_mod, s, device_type = plan
        w0 = base._parameters["weight"]
        b = base._parameters["bias"] if bias else None
        A, B = a_mod._parameters["weight"], b_mod._parameters["weight"]
        if w0.requires_grad or (b is not None and b.requires_grad):
            return None
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            if not all(t.dtype in _AUTOCAST_INPUTS for t in (x, w0, A, B)):
                return None
            x, w0, A, B = x.to(dtype), w0.to(dtype), A.to(dtype), B.to(dtype)
            b = None if b is None else b.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return self._fused(x, w0, b, A, B, s)
        if not (x.dtype == w0.dtype == A.dtype == B.dtype):
            return None
        return self._fused(x, w0, b, A, B, s)

    @staticmethod
    def _fused(x, w0, b, A, B, s: float) -> torch.Tensor:
        if not (
            torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)
        ):
            y = _lora_matmul(x, w0, b, A, B, s)[0]  # inference: no graph node
            return y.view(*x.shape[:-1], y.shape[-1])
        return _LoRAMatmul.apply(x, w0, b, A, B, s)

    def add_update(
        self, result: torch.Tensor, x: torch.Tensor, name: str, dropout: bool = True
    ) -> torch.Tensor:
        """``result + s·B·A·dropout(x)``; ``x``: ``(..., in)``, ``result``: ``(..., out)``.

        When the dtypes agree, one ``addmm`` does the B product, the scaling and the sum:
        no ``(..., out)`` temporaries besides the output, and nothing saved for backward
        but A·x (``(..., r)``). A dropout of 0 is an ``nn.Identity`` (no copy of x).
        ``dropout=False`` when the caller has applied it already.
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        if dropout:
            xa = self.lora_dropout[name](xa)
        ax = nn.functional.linear(xa, A)  # (..., r)
        if result.dtype != B.dtype:  # e.g. a 16-bit base under fp32 adapters
            update = nn.functional.linear(ax, B) * self.scaling[name]
            return result + update.to(result.dtype)
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            ax.reshape(-1, ax.shape[-1]),
            B.t(),
            alpha=self.scaling[name],
        )
        return out.view(result.shape)

    # -- merging: each adapter type says what merged weight it produces and how to undo it,
    # out of place (any base) or in place (a dense [out, in] weight in the adapter's dtype:
    # no [out, in] temporaries, which for a large model is the merge's whole memory peak)
    def _merged_weight(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta_weight(name).to(w0.dtype)

    def _unmerged_weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight(name).to(w.dtype)

    def _merge_in_place(self, name: str, w: torch.Tensor) -> None:
        """``w += s·B·A``, one ``addmm_`` into the weight itself."""
        w.addmm_(self.lora_B[name].weight, self.lora_A[name].weight, alpha=self.scaling[name])

    def _unmerge_in_place(self, name: str, w: torch.Tensor) -> None:
        w.addmm_(self.lora_B[name].weight, self.lora_A[name].weight, alpha=-self.scaling[name])

    def _in_place_weight(self, name: str) -> torch.Tensor | None:
        """The base weight when merging may write straight into it: an ``nn.Linear``'s
        dense weight in the dtype of the adapter's factors; else None."""
        w = self.base_layer.weight
        if type(self.base_layer) is nn.Linear and w.dtype == self.lora_A[name].weight.dtype:
            return w
        return None

    @torch.no_grad()
    def merge(self) -> None:
        self._plan = None
        if self.disabled:
            return
        for name in self.active:
            if name not in self.merged:
                w = self._in_place_weight(name)
                if w is not None:
                    self._merge_in_place(name, w)
                else:
                    merged = self._merged_weight(name, dense_weight(self.base_layer))
                    write_dense_weight(self.base_layer, merged)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        self._plan = None
        while self.merged:
            name = self.merged.pop()
            w = self._in_place_weight(name)
            if w is not None:
                self._unmerge_in_place(name, w)
            else:
                restored = self._unmerged_weight(name, dense_weight(self.base_layer))
                write_dense_weight(self.base_layer, restored)

    def unload(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self.merge()
        else:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}"


def add_low_rank_adapters(
    model: nn.Module, config: LoRAConfig, adapter_name: str, layer_cls: type[LoRALinear]
) -> list[str]:
    """Wrap every targeted linear layer in ``layer_cls`` (reusing a wrapper already there)
    and add adapter ``adapter_name`` to it. Returns the targeted names."""
    targets = find_targets(model, config.target_modules)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            if is_quantized(module):  # loaded in 4 bits (transformers' BitsAndBytesConfig)
                from peftlab.methods.nf4 import adopt_4bit

                adopt_4bit(name, module)
            module = layer_cls(module)
            set_submodule(model, name, module)
        elif type(module) is not layer_cls:
            raise TypeError(f"{name} is a {type(module).__name__}, expected {layer_cls.__name__}")
        module.add_adapter(adapter_name, config)
    return targets


def peft_lora_fields(config: LoRAConfig) -> dict:
    """Fields of peft's LoraConfig for ``adapter_config.json``."""
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": None,
        "inference_mode": True,
    }


def _apply(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    add_low_rank_adapters(model, config, adapter_name, LoRALinear)


def lowrank_memory_plan(name: str, arch, f: dict, dora: bool = False):
    """The memory estimator's closed form of low-rank adapters (LoRA, DoRA, QLoRA's adapters):
    ``r·(in + out)`` per targeted linear, plus ``out`` (the magnitude) with ``dora``."""
    from peftlab.select.methods import MethodPlan, head_params, match_targets, saved_head
    from peftlab.select.presets import BERT

    shapes = arch.linear_shapes()
    r = int(f["r"])
    targets = match_targets(arch, f["target_modules"])
    per_block = sum(
        r * (shapes[s][0] + shapes[s][1]) + (shapes[s][1] if dora else 0) for s in targets
    )
    # BERT's pooler is a linear layer outside the blocks that "all-linear" also targets.
    pooler = (
        r * 2 * arch.hidden + (arch.hidden if dora else 0)
        if arch.family == BERT and f["target_modules"] == "all-linear"
        else 0
    )
    head = saved_head(arch, f)
    return MethodPlan(
        name,
        arch.layers * per_block + pooler + (head_params(arch) if head else 0),
        dict.fromkeys(targets, r),
        dora=dora,
        head_trainable=head,
    )


def lowrank_ladder(arch, quality: str) -> list[dict]:
    """Recommender settings for low-rank methods: ranks on every linear, then on q and v only."""
    from peftlab.select.presets import BERT

    ranks = {"highest": [64, 32, 16, 8], "high": [16, 32, 8], "balanced": [8, 16, 4]}[quality]
    qv = ["query", "value"] if arch.family == BERT else ["q_proj", "v_proj"]
    return [{"r": r, "target_modules": t} for t in ("all-linear", qv) for r in ranks]


LOWRANK_FIELDS = ("r", "target_modules")


register_method(
    MethodSpec(
        "lora",
        LoRAConfig,
        _apply,
        "lora_",
        peft_export=peft_lora_fields,
        memory_plan=lambda arch, f: lowrank_memory_plan("lora", arch, f),
        memory_fields=LOWRANK_FIELDS,
        profile=MethodProfile(
            quality={"generation": 0.95, "classification": 0.96, "multi-task": 0.95},
            speed=1.00,
            overhead=0.0,
            inference="none once merged",
            ladder=lowrank_ladder,
        ),
    )
)
