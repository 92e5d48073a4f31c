"""What a method adds to a model, in the terms the memory estimator needs: trainable
parameters, which base weights it stores in 4 bits, and what extra tensors its forward pass
saves for backward.

The method files build modules; they do not predict them. So each method registers a closed
form of its own structure as ``MethodSpec.memory_plan`` (beside its ``register_method`` line),
returning a :class:`MethodPlan`, and names the config fields it reads in
``MethodSpec.memory_fields`` (their defaults come from the method's config class). This module
holds what those closed forms share: :class:`MethodPlan`, target matching, the classification
head, NF4 storage. Unit tests check every closed form against ``peftlab.trainable_parameters``
after ``peftlab.apply`` on tiny models.

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
from peftlab.core.registry import MethodSpec, get_method
from peftlab.core.registry import methods as registered_methods
from peftlab.select.presets import BERT, Architecture


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
    """The update folds into the base weights (no inference overhead once merged); :func:`plan`
    sets it from the config class's ``mergeable``."""
    trains_base: bool = False
    """The base weights themselves train (``full``): the method adds no parameters, and its
    largest trainable tensor is the largest base weight."""
    inference_extra_params: int = 0
    """Parameters still present at inference (adapters; folded prefix table; soft prompt)."""


def modelled_methods() -> list[str]:
    """Registered methods the memory estimator has a closed form for, in registration order."""
    return [m for m in registered_methods() if get_method(m).memory_plan is not None]


def memory_spec(name: str) -> MethodSpec:
    """The registered spec of method ``name``, which must have a ``memory_plan``."""
    if name in registered_methods() and get_method(name).memory_plan is not None:
        return get_method(name)
    raise ConfigError(
        f"the memory estimator has no model of method {name!r}; known: "
        f"{', '.join(modelled_methods())}"
    )


def method_fields(config: Any) -> tuple[str, dict[str, Any]]:
    """``(method name, fields)`` from a ``MethodConfig``, a dict with ``method``, or a name.

    ``fields``: the method's ``memory_fields`` (given values over the config class's defaults),
    then ``modules_to_save`` when given."""
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
    spec = memory_spec(name)
    defaults = spec.config_cls().to_dict()
    unknown = [k for k in spec.memory_fields if k not in defaults]
    if unknown:
        raise ValueError(
            f"method {name!r}: memory_fields {unknown} are not fields of "
            f"{spec.config_cls.__name__}; name fields of the config class"
        )
    read = {k: defaults[k] for k in spec.memory_fields}
    return name, {
        **read,
        **{k: v for k, v in given.items() if k in read or k == "modules_to_save"},
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


def head_params(arch: Architecture) -> int:
    """Parameters of the output head: a classification model's classifier (none without
    labels), a language model's untied LM head (0 when tied to the input embedding)."""
    if arch.family == BERT:
        return arch.hidden * arch.num_labels + arch.num_labels if arch.num_labels else 0
    return 0 if arch.tied_embeddings else arch.vocab * arch.hidden


def saved_head(arch: Architecture, f: dict) -> bool:
    """``modules_to_save`` trains a classification model's head; None resolves to it for every
    method (``peftlab.core.model.resolve_modules_to_save``), [] to nothing."""
    mts = f.get("modules_to_save")
    return arch.family == BERT and (bool(mts) or (mts is None and arch.num_labels > 0))


def default_head(arch: Architecture, f: dict) -> bool:
    """Virtual-token methods train a classification model's new head unless told otherwise."""
    mts = f.get("modules_to_save")
    return bool(mts) or (mts is None and arch.family == BERT and arch.num_labels > 0)


def plan(arch: Architecture, config: Any) -> MethodPlan:
    """The :class:`MethodPlan` of ``config`` (a config, dict or method name) on ``arch``: the
    method's registered ``memory_plan``, with ``mergeable`` from its config class."""
    name, f = method_fields(config)
    spec = memory_spec(name)
    p = spec.memory_plan(arch, f)
    p.mergeable = spec.config_cls.mergeable
    return p


def nf4_bits(blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per weight of bitsandbytes 4-bit storage: 4 + one absmax per block.

    Without double quantization the absmax is float32 (32/blocksize bits per weight); with it
    the absmax is uint8 plus one float32 scale per 256 absmax values (Dettmers et al. 2023,
    §"Double Quantization"): 4 + 8/64 + 32/(64·256) = 4.127 for blocksize 64.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize
