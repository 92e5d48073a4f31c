"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al.
2020, https://arxiv.org/abs/2005.00247).

    y = h + up(act(down(h))),   down: R^d → R^m,   up: R^m → R^d,   m ≪ d

where ``h`` is the output of a sublayer's output projection, taken before the sublayer's
residual add. ``up`` starts at zero, so every adapter is the identity and the model computes
exactly its base function right after :func:`peftlab.apply`.

Placement:

* ``"houlsby"``: two adapters per transformer block, one after the attention output
  projection and one after the feed-forward output projection (Houlsby et al., Fig. 2).
* ``"pfeiffer"``: one adapter per block, after the feed-forward output only — the placement
  AdapterFusion (Pfeiffer et al. 2020) found as good with half the adapters. AdapterHub's
  ``SeqBnConfig`` additionally moves the adapter behind the block's LayerNorm; peftlab keeps
  both placements at the same spot (before the residual add) so they differ only in count.

The places are found from the module structure, not from a list of model types: a block is an
element of an ``nn.ModuleList`` that has an attention child (a child whose name contains
"attn" or "attention"); its attention output projection is the last linear layer inside that
child whose output width is the hidden size; its feed-forward output projection is the one
linear layer outside the attention child that maps another width to the hidden size. That
finds ``self_attn.o_proj`` / ``mlp.down_proj`` in Llama-family models, ``attn.c_proj`` /
``mlp.c_proj`` in GPT-2 and ``attention.output.dense`` / ``output.dense`` in BERT (whose
residual add and LayerNorm come after ``dense`` and its dropout, so the adapter sits before
the residual add as the paper asks).

The adapter is a nonlinear function of the layer output, so it cannot be folded into the base
weights: the method is not mergeable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig, check
from peftlab.core.matching import find_targets, is_linear, named_modules, set_submodule
from peftlab.core.model import check_free
from peftlab.core.registry import LOW_RANK_LRS, MethodSpec, Tuning, register_method
from peftlab.core.weights import features
from peftlab.core.wrapper import BaseLayerAttributes

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
DEFAULT_REDUCTION_FACTOR = 16


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """Bottleneck adapters after the attention and/or feed-forward output of every block."""

    bottleneck: int | None = None
    """Bottleneck width m of every adapter; give this or reduction_factor, not both."""
    reduction_factor: float | None = None
    """m = hidden size // reduction_factor (16 when neither this nor bottleneck is set)."""
    placement: str = "houlsby"
    """"houlsby" (after attention output and feed-forward output, 2 per block) or "pfeiffer"
    (after the feed-forward output only, 1 per block)."""
    activation: str = "relu"
    """Nonlinearity between down- and up-projection: "relu", "gelu", "swish"/"silu" or "tanh"."""
    dropout: float = 0.0
    """Dropout on the adapter's output before it is added to its input, in [0, 1)."""
    init_scale: float = 1e-3
    """Standard deviation of the normal init of the down-projection (Houlsby et al.'s code uses
    1e-3); the up-projection and both biases start at zero, so the adapter starts as identity."""
    target_modules: str | list[str] | None = None
    """Override the automatic placement: the linear layers (names/suffixes or a regex) whose
    output each gets an adapter. None places adapters by `placement`."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types: bottleneck an integer, reduction_factor a number, ...
        if self.bottleneck is not None:
            check(
                self.bottleneck > 0,
                "bottleneck",
                self.bottleneck,
                "a positive integer no larger than the hidden size, e.g. 64",
            )
            check(
                self.reduction_factor is None,
                "reduction_factor",
                self.reduction_factor,
                f"None when bottleneck is given (bottleneck={self.bottleneck}); set only one of them",
            )
        if self.reduction_factor is not None:
            check(
                self.reduction_factor >= 1,
                "reduction_factor",
                self.reduction_factor,
                "a number ≥ 1, e.g. 16 (bottleneck = hidden // 16)",
            )
        check(
            self.placement in PLACEMENTS,
            "placement",
            self.placement,
            " or ".join(map(repr, PLACEMENTS)),
        )
        check(
            self.activation in ACTIVATIONS,
            "activation",
            self.activation,
            ", ".join(map(repr, ACTIVATIONS)),
        )
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1), e.g. 0.1")
        check(
            0 <= self.init_scale < 1,
            "init_scale",
            self.init_scale,
            "a standard deviation in [0, 1), e.g. 1e-3",
        )
        if self.target_modules is not None:
            check(
                len(self.target_modules) > 0,
                "target_modules",
                self.target_modules,
                "None, a module name list or a regex",
            )

    def bottleneck_size(self, hidden: int) -> int:
        """The bottleneck width m for a layer of width ``hidden``.

        Raises:
            ConfigError: m would be larger than ``hidden`` or smaller than 1.
        """
        if self.bottleneck is not None:
            check(
                self.bottleneck <= hidden,
                "bottleneck",
                self.bottleneck,
                f"at most the hidden size {hidden} of the layers it adapts (a bottleneck narrows)",
            )
            return self.bottleneck
        factor = (
            self.reduction_factor if self.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
        )
        m = int(hidden // factor)
        check(
            m >= 1,
            "reduction_factor",
            factor,
            f"at most the hidden size {hidden}, so the bottleneck hidden // factor is at least 1",
        )
        return m


class BottleneckAdapterLayer(BaseLayerAttributes, nn.Module):
    """A linear layer followed by bottleneck adapters on its output: y = h + up(act(down(h))).

    The base layer is wrapped, never copied. Adapter ``name`` owns ``adapter_down[name]``
    (``Linear(d, m)``) and ``adapter_up[name]`` (``Linear(m, d)``), ``d`` the base layer's
    output width; that is 2·d·m + d + m parameters. Active adapters apply in sequence.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        d = self.out_features
        m = config.bottleneck_size(d)
        w = self.base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        self.adapter_down[name] = nn.Linear(d, m, **kw)
        self.adapter_up[name] = nn.Linear(m, d, **kw)
        self.adapter_act[name] = ACTIVATIONS[config.activation]()
        self.adapter_dropout[name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        nn.init.normal_(self.adapter_down[name].weight, std=config.init_scale)
        nn.init.zeros_(self.adapter_down[name].bias)
        # A zero up-projection makes the adapter the exact identity at init.
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)

    def set_adapter(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapter_down]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., d)``; each active adapter adds up(act(down(h))) to h."""
        h = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return h
        for name in self.active:
            down = self.adapter_down[name]
            z = h if h.dtype == down.weight.dtype else h.to(down.weight.dtype)
            z = self.adapter_up[name](self.adapter_act[name](down(z)))  # (..., m) → (..., d)
            h = h + self.adapter_dropout[name](z).to(h.dtype)
        return h

    def merge(self) -> None:
        raise ConfigError(
            "bottleneck adapters cannot be merged into the base weights (the adapter is a "
            "nonlinear function of the layer output); keep them unmerged or use peftlab.unload"
        )

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""

    def unload(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        sizes = {n: self.adapter_down[n].out_features for n in self.adapter_down}
        return f"d={self.out_features}, bottleneck={sizes}"


def hidden_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return getattr(emb, "embedding_dim", None)


def _architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")


def is_attention_child(name: str) -> bool:
    """A block's child with this name is an attention module ("attn" or "attention" in it)."""
    return "attn" in name.lower() or "attention" in name.lower()


def block_outputs(
    children: Sequence[str], linears: Sequence[tuple[str, int, int]], hidden: int
) -> tuple[list[str], list[str]]:
    """The placement rule for one block, on names and shapes only (the memory estimator runs it
    on an architecture's description, :func:`find_adapter_sites` on a model).

    Args:
        children: the block's child names, in order.
        linears: its linear layers as ``(name relative to the block, in, out)``, in module order.
        hidden: the model's hidden size.

    Returns:
        ``(attention outputs, feed-forward outputs)``: the linears inside the first attention
        child with output width ``hidden``, and those outside every attention child that map
        another width to ``hidden``.
    """

    def inside(name: str, child: str) -> bool:
        return name.startswith(child + ".")

    # Only children holding linear layers: a norm or dropout named after attention
    # ("post_attention_layernorm" before "attention" in GPT-NeoX, "attn_norm" in ModernBERT)
    # is not the attention module.
    attn = [
        c for c in children if is_attention_child(c) and any(inside(n, c) for n, _, _ in linears)
    ]

    # The first attention child is self-attention (cross-attention follows).
    attn_out = [n for n, _, o in linears if attn and inside(n, attn[0]) and o == hidden]
    ffn_out = [
        n
        for n, i, o in linears
        if not any(inside(n, a) for a in attn) and o == hidden and i != hidden
    ]
    return attn_out, ffn_out


def adapted_outputs(attn_out: list[str], ffn_out: list[str], placement: str) -> list[str] | None:
    """The layers of one block that get an adapter under ``placement`` (the last attention
    output for Houlsby, then the feed-forward output); None when the block has no single
    feed-forward output (or, for Houlsby, no attention output)."""
    if len(ffn_out) != 1 or (placement == "houlsby" and not attn_out):
        return None
    return ([attn_out[-1]] if placement == "houlsby" else []) + ffn_out


def transformer_blocks(
    model: nn.Module,
) -> Iterator[tuple[str, list[str], list[tuple[str, int, int]]]]:
    """Every transformer block of ``model`` — an ``nn.ModuleList`` element with an attention
    child — as ``(qualified name, child names, linear layers)``, the linears as
    ``(name relative to the block, in, out)`` in module order (what :func:`block_outputs`
    reads)."""
    for list_name, module_list in named_modules(model):
        if not isinstance(module_list, nn.ModuleList):
            continue
        for idx, block in enumerate(module_list):
            children = [n for n, _ in block.named_children()]
            if any(is_attention_child(c) for c in children):
                linears = [
                    (n, *features(_base(m))) for n, m in named_modules(block) if is_linear(m)
                ]
                yield f"{list_name}.{idx}", children, linears


def find_adapter_sites(model: nn.Module, placement: str) -> list[str]:
    """Qualified names of the linear layers whose output gets an adapter, block by block.

    Raises:
        ConfigError: the model has no block this placement can be found in; the message names
            the architecture and the way out (``target_modules``).
    """
    hidden = hidden_size(model)
    sites: list[str] = []
    problems: list[str] = []
    blocks = 0
    for name, children, linears in transformer_blocks(model):
        blocks += 1
        if hidden is None:
            continue
        attn_out, ffn_out = block_outputs(children, linears, hidden)
        picked = adapted_outputs(attn_out, ffn_out, placement)
        if picked is None:
            problems.append(
                f"{name}: attention outputs {[f'{name}.{n}' for n in attn_out[-1:]] or 'none'}, "
                f"feed-forward outputs {[f'{name}.{n}' for n in ffn_out] or 'none'}"
            )
            continue
        sites.extend(f"{name}.{n}" for n in picked)
    if problems or not sites:
        if problems:
            detail = (
                f"blocks it could not read: {'; '.join(problems[:3])}"
                f"{' …' if len(problems) > 3 else ''} (a mixture-of-experts feed-forward has no "
                f"single output projection)"
            )
        elif blocks and hidden is None:
            detail = "the model has no config.hidden_size or input embeddings to read it from"
        else:
            detail = (
                "it found no transformer block (an nn.ModuleList element with an attention child)"
            )
        raise ConfigError(
            f"cannot place {placement!r} bottleneck adapters in {_architecture(model)}: peftlab "
            f"looks for one attention output projection and one feed-forward output projection "
            f"to the hidden size in every block, and {detail}. Pass "
            f"target_modules=[...] naming the linear layers whose output should get an adapter."
        )
    return sites


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _apply(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
    if config.target_modules is not None:
        sites = find_targets(model, config.target_modules)
    else:
        sites = find_adapter_sites(model, config.placement)
    for name in sites:  # check every layer and size before changing the model
        check_free(name, model.get_submodule(name), BottleneckAdapterLayer)
        config.bottleneck_size(features(_base(model.get_submodule(name)))[1])
    for name in sites:
        module = model.get_submodule(name)
        if not isinstance(module, BottleneckAdapterLayer):
            module = BottleneckAdapterLayer(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config)


register_method(
    MethodSpec(
        "adapter",
        AdapterConfig,
        _apply,
        "adapter_",
        tuning=Tuning(1e-3, {"lr": LOW_RANK_LRS, "bottleneck": (16, 32, 64)}),
    )
)
