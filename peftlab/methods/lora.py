"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    h = W0·x + s·B·A·x,   A ∈ R^{r×in}, B ∈ R^{out×r},   s = alpha / r   (rsLoRA: alpha / √r)

A starts Kaiming-uniform (a=√5) and B at zero, so the model is unchanged at init. The update
folds exactly into W0 for inference (``merge``), and several named adapters can live on one
layer with one of them active.

Layers that a model calls on one input (q/k/v, gate/up) share their A products on the fast
path: the first one called computes ``x·[A_q; A_k; A_v]ᵀ`` as one ``(N, in)·(in, Σr)``
matmul and each layer takes its column block ``x·A_iᵀ`` — the same numbers as its own
product (see :mod:`peftlab.methods._lora_group` for the maths and when it applies).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from peftlab.core.config import MethodConfig, check
from peftlab.core.matching import (
    check_target_modules,
    find_targets,
    is_embedding,
    set_submodule,
)
from peftlab.core.model import check_free
from peftlab.core.registry import LOW_RANK_LRS, MethodSpec, Tuning, register_method
from peftlab.core.weights import dense_weight, features, is_quantized, write_dense_weight
from peftlab.core.wrapper import BaseLayerAttributes
from peftlab.methods import _lora_fused as _fast
from peftlab.methods import _lora_group as _group
from peftlab.methods import _lora_init as _init
from peftlab.methods import _lora_patterns as _patterns
from peftlab.methods._lora_fused import (
    BASE,
    FUSED,
    GENERAL,
    GENERAL_PLAN,
    Plan,
    calls_forward_directly,
    fused,
    fused_projected,
)
from peftlab.methods._lora_fused import _LoRAMatmul as _LoRAMatmul  # docs/performance.md's name
from peftlab.methods._lora_fused import fast_path as fast_path  # the switch, public here
from peftlab.methods._lora_fused import fast_path_enabled as fast_path_enabled
from peftlab.methods._lora_group import grouping as grouping  # grouping's own switch
from peftlab.methods._lora_group import grouping_enabled as grouping_enabled
from peftlab.methods._lora_patterns import embedding_file_key as embedding_file_key
from peftlab.methods._lora_patterns import peft_lora_fields as peft_lora_fields  # dora, qlora

MIN_GROUP_ROWS = 16
"""Token rows below which a call without an autograd graph computes its A product alone."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Low-rank adaptation of the targeted linear layers."""

    extra_inits = ()  # more values of ``init`` a subclass accepts (QLoRA: "loftq")

    mergeable = True

    r: int = 8
    """Rank of the update B·A; higher trains more parameters and adds capacity."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r (alpha / √r with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank path, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Module names/suffixes, a regex, or "all-linear" (every linear layer but the output head);
    an embedding table named here (embed_tokens) gets LoRA too."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha / √r (Kalajdzievski 2023), so larger ranks keep learning."""
    init: str = "kaiming"
    """Init of A: "kaiming" (uniform, a=√5, as the LoRA reference code) or "gaussian" (N(0, 1/r)),
    B at zero; or, for lora, "pissa" (the weight's top-r SVD part) or "olora" (its QR part),
    moved out of the frozen weight into B·A; for qlora, "loftq" (A and B start at the best
    rank-r correction of the 4-bit error)."""
    rank_pattern: dict[str, int] | None = None
    """Other ranks for some modules, e.g. {"q_proj": 16, "layers.0.self_attn.v_proj": 4}: the
    first key matching a module's name's end (a regex) wins; peft's meaning."""
    alpha_pattern: dict[str, float] | None = None
    """Other alphas for some modules, keyed as rank_pattern."""
    layers_to_transform: int | list[int] | None = None
    """Adapt only these layer indices (null: every layer); see layers_pattern."""
    layers_pattern: str | list[str] | None = None
    """The name component before a layer's index ("layers", "h"); null: the first indexed one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.r, int) and self.r > 0, "r", self.r, "a positive integer, e.g. 8")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number, e.g. 2·r")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1), e.g. 0.05")
        residual = _init.RESIDUAL_INITS if self.method == "lora" else ()
        inits = ("kaiming", "gaussian", *residual, *self.extra_inits)
        check(self.init in inits, "init", self.init, " or ".join(map(repr, inits)))
        check_target_modules(self.target_modules)
        _patterns.check_patterns(self)

    def conventional_adapter(self, model: nn.Module, adapter_name: str):
        """``(config, tensors)`` of the plain LoRA equal to this PiSSA/OLoRA adapter on the
        original base (``save_adapter(..., conventional=True)``); None for other inits."""
        if self.init not in _init.RESIDUAL_INITS:
            return None
        return _init.conventional(model, adapter_name)

    def for_module(self, name: str) -> LoRAConfig:
        """This config with the rank and alpha ``rank_pattern``/``alpha_pattern`` give module
        ``name`` (itself when it has no patterns)."""
        if not _patterns.has_patterns(self):
            return self
        r, alpha = _patterns.module_rank_alpha(self, name)
        return self.replace(r=r, alpha=alpha, rank_pattern=None, alpha_pattern=None)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_PLAN_INPUTS = frozenset(
    [
        "base_layer",
        "training",
        "disabled",
        "active",
        "merged",
        "scaling",
        "lora_A",
        "lora_B",
        "lora_dropout",
    ]
)
"""Attributes the plan is computed from: assigning any of them calls ``_invalidate``."""


class LoRALinear(BaseLayerAttributes, nn.Module):
    """A linear layer (``nn.Linear``, ``Conv1D`` or a 4-bit ``Linear4bit``) plus LoRA adapters.

    The base layer is wrapped, never copied. Adapter ``name`` owns ``lora_A[name]``
    (``[r, in]``), ``lora_B[name]`` (``[out, r]``) and a scaling factor. ``disabled``
    switches the adapters off (``peftlab.disable_adapters``): the base layer's output only.

    The forward takes the fast path (see :mod:`peftlab.methods._lora_fused`) through a
    :class:`Plan` cached in ``_plan``; :meth:`_invalidate` is the one place that drops it,
    and every change the plan depends on calls it: assigning an attribute it reads (the
    base layer — QLoRA's merge swaps it —, train/eval mode, ``disabled``…), adding an
    adapter, ``set_adapter``, ``merge``, ``unmerge`` and dtype/device moves (``_apply``).
    Hooks and ``requires_grad`` can change behind the layer's back; they are tested per call.

    ``_group`` (set by :func:`add_low_rank_adapters`) is the :class:`~peftlab.methods.
    _lora_group.Group` of siblings called on the same input, or None.
    """

    _plan: Plan | None
    adapts_embeddings = True
    """Whether this method's adapter may target an embedding table (a
    :class:`~peftlab.methods._lora_embedding.LoRAEmbedding` then holds it)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self._group: _group.Group | None = None
        self.base_layer = base_layer  # the first _invalidate: no plan yet
        self.in_features, self.out_features = features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA's A₀, B₀
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _PLAN_INPUTS:
            self._invalidate()

    def _invalidate(self) -> None:
        """Drop the cached plan (the next forward computes it again, :meth:`_make_plan`) and
        the A products the group holds for this forward."""
        self._plan = None
        group = self.__dict__.get("_group")
        if group is not None:
            group.clear()

    def _apply(self, fn, *args, **kwargs):
        self._invalidate()  # dtype/device moves: the plan holds the weight's device type
        return super()._apply(fn, *args, **kwargs)

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
        if config.init in _init.RESIDUAL_INITS:
            _init.init_residual(self, name, config.init)
        else:
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
            nn.init.zeros_(self.lora_B[name].weight)
        self._invalidate()

    def set_adapter(self, names: list[str]) -> None:
        if self.merged:
            self.unmerge()
        self.active = [n for n in names if n in self.lora_A]  # assignment: _invalidate

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A as ``[out, in]``."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``."""
        rows = self.__dict__.get("_rows")  # set by peftlab.adapter_rows: a mixed batch
        if rows is not None:
            return rows.forward(self, x)
        if not _fast.ENABLED:
            return self._plain_forward(x)
        plan = self._ready_plan()
        if plan is not None:
            if plan.kind is BASE:  # disabled, merged or no adapter: the bare model's call
                base = plan.base._parameters
                return nn.functional.linear(x, base["weight"], base["bias"])
            y = self._fused_output(plan, x)
            if y is not None:
                return y
        return self._general_forward(x)

    def _make_plan(self) -> Plan:
        """The plan for the layer's current state (the only place one is computed)."""
        base = self.base_layer
        if type(base) is not nn.Linear:  # Conv1D, 4-bit: called as a module
            return GENERAL_PLAN
        if self.disabled or self.merged or not self.active:
            return Plan(BASE, base)
        if len(self.active) != 1:
            return GENERAL_PLAN
        name = self.active[0]
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            return GENERAL_PLAN  # dropout(x) feeds the update only: autograd's graph
        a, b = self.lora_A[name], self.lora_B[name]
        return Plan(FUSED, base, name, a, b, self.scaling[name], base.weight.device.type)

    def _ready_plan(self) -> Plan | None:
        """The cached plan (computed if dropped) when it may skip calling the base layer:
        of kind ``BASE`` or ``FUSED`` and the base without hooks; else ``None``."""
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan()
        if plan.kind is GENERAL or not calls_forward_directly(plan.base):
            return None
        return plan

    def fused_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor | None:
        """``W0·x (+ b) + s·B·A·x`` for the one active adapter through one fused node, or
        ``None`` where that does not apply: fast path off, several or no active adapters,
        merged, a 4-bit or hooked base, dropout in training, a trainable base weight or
        bias, or dtypes that differ."""
        plan = self._ready_plan() if _fast.ENABLED else None
        if plan is None or plan.kind is not FUSED:
            return None
        return self._fused(plan, x, bias)

    def _fused_output(self, plan: Plan, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output on a ``FUSED`` plan, or ``None`` to take the general path."""
        return self._fused(plan, x, True)

    def _fused(self, plan: Plan, x: torch.Tensor, bias: bool) -> torch.Tensor | None:
        """:func:`fused` on the plan's weights (:func:`fused_projected` when the group
        supplies x·Aᵀ), unless they fail the per-call tests (a trainable base, dtypes that
        differ). Under autocast the operands are cast to its dtype first, as autocast does
        for ``F.linear``, and the node runs in that dtype (gradients reach A and B through
        the casts, in their own dtype)."""
        w0 = plan.base._parameters["weight"]
        b = plan.base._parameters["bias"] if bias else None
        A, B = plan.lora_a._parameters["weight"], plan.lora_b._parameters["weight"]
        if w0.requires_grad or (b is not None and b.requires_grad):
            return None
        cast = None
        if torch.is_autocast_enabled(plan.device_type):
            cast = torch.get_autocast_dtype(plan.device_type)
            if not all(t.dtype in _AUTOCAST_INPUTS for t in (x, w0, A, B)):
                return None
        elif not (x.dtype == w0.dtype == A.dtype == B.dtype):
            return None
        ax = self._projection(x, plan.name)  # after the tests: taken once, here or in add_update
        if cast is None:
            if ax is not None:
                return fused_projected(x, w0, b, ax, B, plan.scale)
            return fused(x, w0, b, A, B, plan.scale)
        x, w0, B = x.to(cast), w0.to(cast), B.to(cast)
        b = None if b is None else b.to(cast)
        with torch.autocast(plan.device_type, enabled=False):
            if ax is not None:  # computed under the same autocast: already in its dtype
                return fused_projected(x, w0, b, ax.to(cast), B, plan.scale)
            return fused(x, w0, b, A.to(cast), B, plan.scale)

    # -- grouped A products (see peftlab.methods._lora_group)
    def _shares_input(self, name: str) -> bool:
        """Whether adapter ``name``'s A reads the layer's input itself: no dropout drawn."""
        return not self.training or isinstance(self.lora_dropout[name], nn.Identity)

    def _group_names(self) -> list[str]:
        """The active adapters whose x·Aᵀ the group may compute (the group keeps the answer
        until :meth:`_invalidate`: it depends on nothing else)."""
        if self.disabled or self.merged:
            return []
        return [n for n in self.active if self._shares_input(n)]

    def _projection(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``x·A_nameᵀ`` (``(N, r)``, x's leading dims flattened) from the group's product, or
        ``None`` (no group, grouping off, dropout drawn, under ``torch.compile``, a decode
        step): compute it alone. A call without a graph on fewer than
        :data:`MIN_GROUP_ROWS` token rows (generation's decode steps) is not grouped: there
        the bookkeeping costs more than the one pass over x it saves (measured ~25-30 µs per
        q/k/v call, ~25% of that group's decode step on the CPU)."""
        group = self._group
        if (
            group is None
            or (not torch.is_grad_enabled() and x.numel() < MIN_GROUP_ROWS * x.shape[-1])
            or not (_group.ENABLED and _fast.ENABLED)
            or not self._shares_input(name)
            or torch.compiler.is_compiling()
        ):
            return None
        return group.take(self, x, name)

    def _general_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer called as a module, each active update added by one ``addmm``."""
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        for name in self.active:
            result = self.add_update(result, x, name)
        return result

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The composed formula ``base_layer(x) + s·B·A·dropout(x)``, nothing fused or cached
        (the fast path off)."""
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        for name in self.active:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            xa = self.lora_dropout[name](x.to(A.dtype))
            update = nn.functional.linear(nn.functional.linear(xa, A), B) * self.scaling[name]
            result = result + update.to(result.dtype)
        return result

    def add_update(
        self, result: torch.Tensor, x: torch.Tensor, name: str, dropout: bool = True
    ) -> torch.Tensor:
        """``result + s·B·A·dropout(x)``; ``x``: ``(..., in)``, ``result``: ``(..., out)``.

        When the dtypes agree, one ``addmm`` does the B product, the scaling and the sum:
        no ``(..., out)`` temporaries besides the output, and nothing saved for backward
        but A·x (``(..., r)``; ``(N, r)``, a block of the group's product, when the layer
        has one). A dropout of 0 is an ``nn.Identity`` (no copy of x). ``dropout=False``
        when the caller has applied it already.
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        ax = self._projection(x, name)  # (N, r), the group's block
        if ax is None:
            xa = x if x.dtype == A.dtype else x.to(A.dtype)
            if dropout:
                xa = self.lora_dropout[name](xa)
            ax = nn.functional.linear(xa, A)  # (..., r)
        if result.dtype != B.dtype:  # e.g. a 16-bit base under fp32 adapters
            update = nn.functional.linear(ax, B) * self.scaling[name]
            return result + update.to(result.dtype).view(result.shape)
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
        self._invalidate()
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
        self._invalidate()
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
            _init.restore_base(self)  # PiSSA/OLoRA: the original weight, not the residual
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}"


def add_low_rank_adapters(
    model: nn.Module, config: LoRAConfig, adapter_name: str, layer_cls: type[LoRALinear]
) -> list[str]:
    """Wrap every targeted linear layer in ``layer_cls`` (reusing a wrapper already there)
    and add adapter ``adapter_name`` to it; then group the model's LoRA layers that share
    an input (:func:`peftlab.methods._lora_group.link`). Returns the targeted names."""
    targets = _patterns.kept_layers(
        config, find_targets(model, config.target_modules, embeddings=True)
    )
    _patterns.check_keys_match(config, targets)
    for name in targets:
        module = model.get_submodule(name)
        cls = layer_cls
        if is_embedding(module):  # LoRA on a lookup table (imported here: it subclasses ours)
            from peftlab.methods._lora_embedding import embedding_layer_class

            cls = embedding_layer_class(name, module, config, layer_cls)
        check_free(name, module, cls)
        if not isinstance(module, LoRALinear):
            if is_quantized(module):  # loaded in 4 bits (transformers' BitsAndBytesConfig)
                from peftlab.methods.nf4 import adopt_4bit

                adopt_4bit(name, module)
            module = cls(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config.for_module(name))
    _group.link((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))
    return targets


def _apply(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    _init.check_alone(model, config, adapter_name)
    add_low_rank_adapters(model, config, adapter_name, LoRALinear)


register_method(
    MethodSpec(
        "lora",
        LoRAConfig,
        _apply,
        "lora_",
        peft_export=peft_lora_fields,
        file_key=embedding_file_key,
        tuning=Tuning(1e-3, {"lr": LOW_RANK_LRS, "r": (8, 16, 32)}),
    )
)
