"""Closed forms for what each method adds to a model: trainable parameters, which base weights
it stores in 4 bits, and what extra tensors its forward pass saves for backward.

The estimator needs per-method knowledge that the method files do not expose (they build
modules; they do not predict them), so this file mirrors each method's structure as a
:class:`MethodPlan`. Unit tests check every closed form against
``peftlab.trainable_parameters`` after ``peftlab.apply`` on tiny models, and every default here
against the method's config class.

Counts (per block, ``d`` = hidden, ``L`` = layers; "linears" = targeted linear layers):

- ``full``: every parameter (minus the input embedding with ``freeze_embeddings``).
- ``lora`` / ``qlora``: ``Σ_linears r·(in + out)``; ``dora`` / QDoRA add ``out`` per linear (the
  magnitude vector).
- ``adapter``: per adapter ``d·m + m + m·d + d`` (down and up with biases), ``m = d // 16`` by
  default; Houlsby places 2 per block, Pfeiffer 1.
- ``prefix`` (``reparam``): embedding ``p·d`` + MLP ``d·H + H + H·W + W`` with
  ``W = L·2·n_kv·d_head`` and ``H = reparam_hidden``; without reparam (``ptuning-v2``) the table
  ``p·W``.
- ``prompt``: ``p·d``.
- Prefix, P-Tuning v2 and prompt tuning also train a classification model's new head
  (``modules_to_save`` defaults to it); every method trains ``modules_to_save`` when given.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.select.presets import BERT, Architecture

DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"freeze_embeddings": False},
    "lora": {"r": 8, "target_modules": "all-linear"},
    "dora": {"r": 8, "target_modules": "all-linear"},
    "qlora": {
        "r": 8,
        "target_modules": "all-linear",
        "use_dora": False,
        "double_quant": True,
        "blocksize": 64,
        "quant_type": "nf4",
        "gradient_checkpointing": False,
    },
    "adapter": {
        "bottleneck": None,
        "reduction_factor": None,
        "placement": "houlsby",
        "activation": "relu",
    },
    "prefix": {"num_virtual_tokens": 20, "reparam": True, "reparam_hidden": 512},
    "ptuning-v2": {"num_virtual_tokens": 20, "reparam": False, "reparam_hidden": 512},
    "prompt": {"num_virtual_tokens": 20},
}
"""Fields the estimator reads, with each method config's defaults (checked by a test)."""

MERGEABLE = {"full": True, "lora": True, "dora": True, "qlora": True}
"""Methods whose update folds into the base weights (no inference overhead once merged)."""


@dataclasses.dataclass
class MethodPlan:
    """What a method does to a model, in the terms the estimator needs."""

    method: str
    trainable: int
    """Trainable parameters."""
    targets: dict[str, int]
    """Per-block linear suffix → low-rank r (0: trained in full by ``full``)."""
    dora: bool = False
    quantized: int = 0
    """Base weights stored in 4 bits."""
    quant_bits: float = 16.0
    """Bits per quantized weight, constants included."""
    adapters: list[str] = dataclasses.field(default_factory=list)
    """Per-block linear suffixes whose output passes a bottleneck adapter."""
    bottleneck: int = 0
    adapter_act_saves: int = 1
    """Tensors of width m the adapter activation saves (ReLU/Tanh: its output; GELU/SiLU: input and output)."""
    kv_extra: int = 0
    """Virtual key/value positions every layer attends to (prefix, P-Tuning v2)."""
    seq_extra: int = 0
    """Virtual tokens prepended to the input sequence (prompt tuning)."""
    prefix_mlp_hidden: int = 0
    """Hidden width of the prefix reparameterization MLP (0: none)."""
    head_trainable: bool = False
    """The classification head / LM head trains (``full``, or a default ``modules_to_save``)."""
    norms_trainable: bool = False
    embeddings_trainable: bool = False
    upcast_non_quantized: bool = False
    """QLoRA casts every 16-bit parameter outside the 4-bit layers to float32 (and so the
    hidden states run in float32)."""
    checkpointing: bool = False
    mergeable: bool = False
    inference_extra_params: int = 0
    """Parameters still present at inference (adapters; folded prefix table; soft prompt)."""


def method_fields(config: Any) -> tuple[str, dict[str, Any]]:
    """``(method name, fields)`` from a ``MethodConfig``, a dict with ``method``, or a name."""
    if isinstance(config, str):
        name, given = config, {}
    elif isinstance(config, dict):
        if "method" not in config:
            raise ConfigError(
                "a method config dict needs a 'method' key, e.g. {'method': 'lora', 'r': 8}"
            )
        name, given = config["method"], {k: v for k, v in config.items() if k != "method"}
    else:
        name, given = config.method, config.to_dict()
        given.pop("method", None)
    if name not in DEFAULTS:
        raise ConfigError(
            f"the memory estimator has no model of method {name!r}; known: {', '.join(DEFAULTS)}"
        )
    return name, {
        **DEFAULTS[name],
        **{k: v for k, v in given.items() if k in DEFAULTS[name] or k == "modules_to_save"},
    }


def _block_prefix(arch: Architecture) -> str:
    return "bert.encoder.layer" if arch.family == BERT else "model.layers"


def match_targets(arch: Architecture, target_modules: Any) -> list[str]:
    """Per-block linear suffixes that ``target_modules`` selects, with peftlab's matching rules
    (``"all-linear"``, a regex full-matching the qualified name, or names/suffixes). A target
    that selects only some blocks is counted for every block (an upper bound)."""
    suffixes = list(arch.linear_shapes())
    names = {s: f"{_block_prefix(arch)}.0.{s}" for s in suffixes}
    if target_modules == "all-linear":
        return suffixes
    if isinstance(target_modules, str):
        return [
            s
            for s, n in names.items()
            if re.fullmatch(target_modules, n)
            or re.fullmatch(target_modules, n.replace(".0.", ".1."))
        ]
    hits = [
        s for s, n in names.items() if any(n == t or n.endswith("." + t) for t in target_modules)
    ]
    if not hits:
        raise ConfigError(
            f"target_modules={target_modules!r} matches no linear layer of {arch.name}; its "
            f"per-block linear layers are: {', '.join(suffixes)}"
        )
    return hits


def _head_params(arch: Architecture) -> int:
    if arch.family == BERT:
        return arch.hidden * arch.num_labels + arch.num_labels if arch.num_labels else 0
    return 0 if arch.tied_embeddings else arch.vocab * arch.hidden


def _default_head(arch: Architecture, f: dict) -> bool:
    """Virtual-token methods train a classification model's new head unless told otherwise."""
    mts = f.get("modules_to_save")
    return bool(mts) or (mts is None and arch.family == BERT and arch.num_labels > 0)


def plan(arch: Architecture, config: Any) -> MethodPlan:
    """The :class:`MethodPlan` of ``config`` (a config, dict or method name) on ``arch``."""
    name, f = method_fields(config)
    shapes = arch.linear_shapes()
    L, d = arch.layers, arch.hidden
    head_trainable = bool(f.get("modules_to_save")) and arch.family == BERT
    extra_head = _head_params(arch) if head_trainable else 0
    if name == "full":
        total = arch.total_params()
        frozen = arch.vocab * d if f["freeze_embeddings"] else 0
        return MethodPlan(
            name,
            total - frozen,
            {s: 0 for s in shapes},
            head_trainable=True,
            norms_trainable=True,
            embeddings_trainable=not f["freeze_embeddings"],
            mergeable=True,
        )
    if name in ("lora", "dora", "qlora"):
        r = int(f["r"])
        dora = name == "dora" or bool(f.get("use_dora"))
        targets = match_targets(arch, f["target_modules"])
        per_block = sum(
            r * (shapes[s][0] + shapes[s][1]) + (shapes[s][1] if dora else 0) for s in targets
        )
        # BERT's pooler is a linear layer outside the blocks that "all-linear" also targets.
        pooler = (
            r * 2 * d + (d if dora else 0)
            if arch.family == BERT and f["target_modules"] == "all-linear"
            else 0
        )
        p = MethodPlan(
            name,
            L * per_block + pooler + extra_head,
            dict.fromkeys(targets, r),
            dora=dora,
            head_trainable=head_trainable,
            mergeable=True,
        )
        if name == "qlora":
            p.quantized = L * sum(shapes[s][0] * shapes[s][1] for s in targets)
            p.quant_bits = nf4_bits(int(f["blocksize"]), bool(f["double_quant"]))
            p.upcast_non_quantized = True
            p.checkpointing = bool(f["gradient_checkpointing"])
        return p
    if name == "adapter":
        m = f["bottleneck"] or d // (f["reduction_factor"] or 16)
        # After the attention output projection and the feed-forward output projection.
        places = (
            ["attention.output.dense", "output.dense"]
            if arch.family == BERT
            else ["self_attn.o_proj", "mlp.down_proj"]
        )
        if f["placement"] == "pfeiffer":
            places = places[1:]
        n = L * len(places) * (2 * d * m + m + d)
        return MethodPlan(
            name,
            n + extra_head,
            {},
            adapters=places,
            bottleneck=m,
            head_trainable=head_trainable,
            adapter_act_saves=2 if f["activation"] in ("gelu", "swish", "silu") else 1,
            inference_extra_params=n,
        )
    if name in ("prefix", "ptuning-v2"):
        p_tok = int(f["num_virtual_tokens"])
        width = L * 2 * arch.kv_dim
        hid = int(f["reparam_hidden"]) if f["reparam"] else 0
        n = p_tok * d + d * hid + hid + hid * width + width if hid else p_tok * width
        head = _default_head(arch, f)
        return MethodPlan(
            name,
            n + (_head_params(arch) if head else 0),
            {},
            kv_extra=p_tok,
            prefix_mlp_hidden=hid,
            head_trainable=head,
            inference_extra_params=p_tok * width,
        )
    # prompt
    p_tok = int(f["num_virtual_tokens"])
    head = _default_head(arch, f)
    return MethodPlan(
        name,
        p_tok * d + (_head_params(arch) if head else 0),
        {},
        seq_extra=p_tok,
        head_trainable=head,
        inference_extra_params=p_tok * d,
    )


def nf4_bits(blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per weight of bitsandbytes 4-bit storage: 4 + one absmax per block.

    Without double quantization the absmax is float32 (32/blocksize bits per weight); with it
    the absmax is uint8 plus one float32 scale per 256 absmax values (Dettmers et al. 2023,
    §"Double Quantization"): 4 + 8/64 + 32/(64·256) = 4.127 for blocksize 64.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize
