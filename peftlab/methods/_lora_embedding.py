"""LoRA on an embedding table (``nn.Embedding``): the input embeddings, or any lookup table.

An embedding is a linear map of a one-hot token vector, ``E[t] = Eᵀ·onehot(t)`` with the table
``E ∈ R^{V×d}``, so LoRA's update applies as to any linear layer with ``in = V`` and
``out = d``:

    h(t) = E[t] + s·B·A[:, t],   A ∈ R^{r×V}, B ∈ R^{d×r},   s = alpha / r   (rsLoRA: / √r)

computed as a lookup of A's column (``F.embedding(t, Aᵀ)``, ``(…, r)``) times ``Bᵀ`` — no
one-hot product. As in the LoRA reference code (loralib's ``Embedding``) and peft, A starts
at zero and B from N(0, 1) — the roles of a linear layer's factors swapped —, so the model is
unchanged at init; merging adds ``s·(B·A)ᵀ`` (``[V, d]``) to the table. A's gradient reaches
only the columns of the ids a batch holds. peft's file keys are ``….lora_embedding_A``
(``[r, V]``) and ``….lora_embedding_B`` (``[d, r]``); the layer holds its factors under those
names and exposes them as ``lora_A`` / ``lora_B`` too, so combining, hot swaps, mixed batches
and LoRA+ treat it as any LoRA layer.

Scaled embeddings (Gemma's ``embed_scale``) scale the update as the base. Dropout does not
apply (an id cannot be dropped out, as in peft). ``padding_idx`` and ``scale_grad_by_freq``
of the base apply to A's lookup (the padding id's column gets no gradient); a table with
``max_norm`` (renormalized in place at each lookup) or ``sparse`` gradients is refused.

A table tied to the output head (``tie_word_embeddings``: SmolLM2, GPT-2) keeps the head as it
is: the update is added to the lookup only; a merge gives the embedding its own weight first
(:func:`peftlab.core.model.merge`), so the merged model computes what the adapted one did.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.methods._lora_fused import GENERAL_PLAN, Plan
from peftlab.methods.lora import LoRAConfig, LoRALinear


def check_embedding(name: str, module: nn.Module, config: LoRAConfig) -> None:
    """Refuse (one line) a LoRA on embedding ``module`` that it cannot compute exactly."""
    base = getattr(module, "base_layer", module)
    if base.max_norm is not None or base.sparse:
        what = f"max_norm={base.max_norm}" if base.max_norm is not None else "sparse=True"
        raise ConfigError(
            f"target_modules: embedding {name} has {what}, which LoRA on embeddings does not "
            f"support; leave {name.rsplit('.', 1)[-1]!r} out of target_modules"
        )
    if config.init not in ("kaiming", "gaussian"):
        raise ConfigError(
            f"init={config.init!r} applies to linear layers; embedding {name} is targeted — "
            f"leave {name.rsplit('.', 1)[-1]!r} out of target_modules or use init 'kaiming'"
        )


class LoRAEmbedding(LoRALinear):
    """An ``nn.Embedding`` plus LoRA adapters: adapter ``name`` owns
    ``lora_embedding_A[name]`` (a factor whose ``weight`` is ``[r, V]``) and
    ``lora_embedding_B[name]`` (``[d, r]``) and a scaling; see the module docstring."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self._group = None
        self._plan = None
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ModuleDict()
        self.lora_embedding_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    @property
    def lora_A(self) -> nn.ModuleDict:  # type: ignore[override]
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.ModuleDict:  # type: ignore[override]
        return self.lora_embedding_B

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        a = nn.Linear(self.in_features, config.r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(config.r, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.zeros_(a.weight)
        nn.init.normal_(b.weight)
        self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b
        self.lora_dropout[name] = nn.Identity()
        self.scaling[name] = config.scaling
        self._invalidate()

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·(B·A)ᵀ as the table's ``[V, d]``."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight).T * self.scaling[name]

    def _make_plan(self) -> Plan:
        return GENERAL_PLAN

    def _group_names(self) -> list[str]:
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``x`` ``(…)`` → ``(…, d)``."""
        rows = self.__dict__.get("_rows")  # set by peftlab.adapter_rows: a mixed batch
        if rows is not None:
            return rows.forward(self, x)
        return self._general_forward(x)  # the base lookup, then each active update

    def add_update(
        self, result: torch.Tensor, x: torch.Tensor, name: str, dropout: bool = True
    ) -> torch.Tensor:
        """``result + s·B·A[:, x]`` (times the base's ``embed_scale`` if it has one)."""
        base = self.base_layer
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        after_a = nn.functional.embedding(
            x, A.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq
        )
        update = nn.functional.linear(after_a, B) * self.scaling[name]
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            update = update * (scale.to(update.dtype) if torch.is_tensor(scale) else scale)
        return result + update.to(result.dtype)

    def _merge_in_place(self, name: str, w: torch.Tensor) -> None:
        """``w += s·Aᵀ·Bᵀ``, one ``addmm_`` into the table."""
        w.addmm_(self.lora_A[name].weight.T, self.lora_B[name].weight.T, alpha=self.scaling[name])

    def _unmerge_in_place(self, name: str, w: torch.Tensor) -> None:
        w.addmm_(self.lora_A[name].weight.T, self.lora_B[name].weight.T, alpha=-self.scaling[name])

    def _in_place_weight(self, name: str) -> torch.Tensor | None:
        w = self.base_layer.weight
        return w if w.dtype == self.lora_A[name].weight.dtype else None

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.in_features}, dim={self.out_features}, "
            f"adapters={list(self.lora_A)}"
        )


def embedding_layer_class(
    name: str, module: nn.Module, config: LoRAConfig, layer_cls: type
) -> type:
    """The layer class for an embedding target (:mod:`peftlab.methods._lora_embedding`), or a
    one-line refusal where ``layer_cls``' method or ``config`` cannot adapt one."""
    if not layer_cls.adapts_embeddings:
        raise ConfigError(
            f"target_modules: {name} is an embedding table, which {layer_cls.__name__} does not "
            f"adapt (LoRA and QLoRA do); leave {name.rsplit('.', 1)[-1]!r} out of target_modules"
        )
    check_embedding(name, module, config.for_module(name))
    return LoRAEmbedding
