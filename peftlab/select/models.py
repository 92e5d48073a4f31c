"""What the memory estimator and the recommender know of each method, in one table keyed by the
method's registered name: its memory plan (a closed form from :mod:`peftlab.select.plans`),
the config fields that plan reads, and the recommender's priors.

The methods themselves (``peftlab/methods/``) know nothing of this: a method registers its
mechanics with the core; whoever adds one also adds its row to :data:`MODELS`, or names it in
:data:`NOT_MODELLED` with the reason (a unit test fails until one of the two is done).

Priors are relative figures from each method's paper (sources in docs/estimator.md), replaced
by measured ones when ``peftlab recommend --results`` points at a ``peftlab compare`` output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.registry import get_method
from peftlab.core.registry import methods as registered_methods
from peftlab.select import plans
from peftlab.select.plans import MethodPlan
from peftlab.select.presets import QUERY_VALUE, Architecture


@dataclasses.dataclass(frozen=True)
class MethodProfile:
    """What ``peftlab recommend`` assumes of a method before it is measured."""

    quality: dict[str, float]
    """Expected quality relative to full fine-tuning per task ("generation", "classification",
    "multi-task")."""
    speed: float
    """Training speed relative to LoRA."""
    overhead: float
    """Inference slowdown as a fraction of the base model's latency (0: none)."""
    inference: str
    """The inference overhead, in words."""
    ladder: Callable[[Architecture, str], list[dict]] | None = None
    """``(Architecture, quality) → config settings`` to try, best quality first; ``quality`` is
    "highest", "high" or "balanced". None: the method's defaults only."""


@dataclasses.dataclass(frozen=True)
class MethodModel:
    """The estimator's and the recommender's knowledge of one method."""

    plan: Callable[[Architecture, dict], MethodPlan]
    """The closed form: ``(Architecture, fields) → MethodPlan``, where ``fields`` holds
    :attr:`fields` of the config (defaults from the method's config class) plus
    ``modules_to_save`` when given."""
    fields: tuple[str, ...]
    """The config fields :attr:`plan` reads."""
    profile: MethodProfile
    """The recommender's priors."""


def lowrank_ladder(arch: Architecture, quality: str) -> list[dict]:
    """Recommender settings for low-rank methods: ranks on every linear, then on q and v only."""
    ranks = {"highest": [64, 32, 16, 8], "high": [16, 32, 8], "balanced": [8, 16, 4]}[quality]
    return [
        {"r": r, "target_modules": t}
        for t in ("all-linear", QUERY_VALUE[arch.family])
        for r in ranks
    ]


def virtual_token_ladder(arch: Architecture, quality: str) -> list[dict]:
    """Recommender settings for virtual-token methods: 20, then 10 tokens."""
    return [{"num_virtual_tokens": n} for n in (20, 10)]


LOWRANK_FIELDS = ("r", "target_modules", "rank_pattern", "layers_to_transform", "layers_pattern")
PREFIX_FIELDS = ("num_virtual_tokens", "reparam", "reparam_hidden")
_KV_PREFIX = "p extra key/value positions per layer"

MODELS: dict[str, MethodModel] = {
    "full": MethodModel(
        plans.full_plan,
        ("freeze_embeddings",),
        MethodProfile(
            quality={"generation": 1.00, "classification": 1.00, "multi-task": 0.95},
            speed=0.75,
            overhead=0.0,
            inference="none (a new full model)",
        ),
    ),
    "lora": MethodModel(
        lambda arch, f: plans.lowrank_plan("lora", arch, f),
        LOWRANK_FIELDS,
        MethodProfile(
            quality={"generation": 0.95, "classification": 0.96, "multi-task": 0.95},
            speed=1.00,
            overhead=0.0,
            inference="none once merged",
            ladder=lowrank_ladder,
        ),
    ),
    "dora": MethodModel(
        lambda arch, f: plans.lowrank_plan("dora", arch, f, dora=True),
        LOWRANK_FIELDS,
        MethodProfile(
            quality={"generation": 0.97, "classification": 0.97, "multi-task": 0.96},
            speed=0.95,  # measured: DoRA step 0.952–1.051× peftlab LoRA (docs/performance.md)
            overhead=0.0,
            inference="none once merged",
            ladder=lowrank_ladder,
        ),
    ),
    "qlora": MethodModel(
        plans.qlora_plan,
        (
            *LOWRANK_FIELDS,
            "use_dora",
            "double_quant",
            "blocksize",
            "quant_type",
            "compute_dtype",
            "gradient_checkpointing",
        ),
        MethodProfile(
            quality={"generation": 0.94, "classification": 0.95, "multi-task": 0.93},
            speed=0.70,
            overhead=0.0,
            inference="none once merged into 16-bit weights",
            ladder=lowrank_ladder,
        ),
    ),
    "adapter": MethodModel(
        plans.adapter_plan,
        ("bottleneck", "reduction_factor", "placement", "activation", "target_modules"),
        MethodProfile(
            quality={"generation": 0.90, "classification": 0.95, "multi-task": 0.95},
            speed=1.05,
            overhead=0.10,
            inference="two small MLPs per block (not mergeable)",
            ladder=lambda arch, quality: [{"reduction_factor": f} for f in (16, 32, 64)],
        ),
    ),
    "ia3": MethodModel(
        plans.ia3_plan,
        ("target_modules", "feedforward_modules"),
        MethodProfile(
            quality={"generation": 0.75, "classification": 0.92, "multi-task": 0.90},
            speed=1.05,
            overhead=0.0,
            inference="none once merged",
        ),
    ),
    "loha": MethodModel(
        plans.loha_plan,
        ("r", "target_modules"),
        MethodProfile(
            # No common benchmark puts LoHa beside LoRA on these tasks: LoRA's priors, stated
            # as such in docs/estimator.md, until `recommend --results` brings measured ones.
            # Speed: measured 2.08x LoRA's step at equal parameters (docs/estimator.md).
            quality={"generation": 0.95, "classification": 0.96, "multi-task": 0.95},
            speed=0.50,
            overhead=0.0,
            inference="none once merged",
        ),
    ),
    "lokr": MethodModel(
        plans.lokr_plan,
        ("r", "target_modules", "decompose_both", "decompose_factor"),
        MethodProfile(
            # As LoHa: LoRA's quality priors until measured (docs/estimator.md); speed
            # measured 1.92x LoRA's step (benchmarks/lycoris_step.py).
            quality={"generation": 0.95, "classification": 0.96, "multi-task": 0.95},
            speed=0.52,
            overhead=0.0,
            inference="none once merged",
        ),
    ),
    "vera": MethodModel(
        plans.vera_plan,
        ("r", "target_modules"),
        MethodProfile(
            # Quality assumed, not measured: the VeRA paper reports GLUE and E2E scores near
            # LoRA's with ~10x fewer parameters (docs/estimator.md), so LoRA's priors a step
            # lower. Speed measured: r=256 took 1.47x LoRA r=8's step (docs/estimator.md).
            quality={"generation": 0.93, "classification": 0.95, "multi-task": 0.93},
            speed=0.68,
            overhead=0.0,
            inference="none once merged",
        ),
    ),
    "prefix": MethodModel(
        lambda arch, f: plans.prefix_plan("prefix", arch, f),
        PREFIX_FIELDS,
        MethodProfile(
            quality={"generation": 0.80, "classification": 0.85, "multi-task": 0.82},
            speed=1.10,
            overhead=0.10,
            inference=_KV_PREFIX,
            ladder=virtual_token_ladder,
        ),
    ),
    "ptuning-v2": MethodModel(
        lambda arch, f: plans.prefix_plan("ptuning-v2", arch, f),
        PREFIX_FIELDS,
        MethodProfile(
            quality={"generation": 0.80, "classification": 0.93, "multi-task": 0.85},
            speed=1.10,
            overhead=0.10,
            inference=_KV_PREFIX,
            ladder=virtual_token_ladder,
        ),
    ),
    "prompt": MethodModel(
        plans.prompt_plan,
        ("num_virtual_tokens",),
        MethodProfile(
            quality={"generation": 0.65, "classification": 0.75, "multi-task": 0.70},
            speed=1.10,
            overhead=0.05,
            inference="p extra input tokens",
            ladder=virtual_token_ladder,
        ),
    ),
}
"""Method name → its memory plan, the fields the plan reads and its priors."""

NOT_MODELLED: dict[str, str] = {}
"""Registered methods the estimator and the recommender deliberately leave out, with the
reason (every built-in method is modelled)."""


def unaccounted() -> list[str]:
    """Registered methods neither in :data:`MODELS` nor in :data:`NOT_MODELLED` (should be
    none: a new method needs a row in one of them)."""
    return [m for m in registered_methods() if m not in MODELS and m not in NOT_MODELLED]


def modelled_methods() -> list[str]:
    """Registered methods the memory estimator has a closed form for, in registration order."""
    return [m for m in registered_methods() if m in MODELS]


def memory_model(name: str) -> MethodModel:
    """The row of method ``name``, which must be registered and modelled.

    Raises:
        ConfigError: the estimator has no model of ``name``; the message lists those it has.
    """
    if name in MODELS and name in registered_methods():
        return MODELS[name]
    why = f" ({NOT_MODELLED[name]})" if name in NOT_MODELLED else ""
    raise ConfigError(
        f"the memory estimator has no model of method {name!r}{why}; known: "
        f"{', '.join(modelled_methods())}"
    )


def method_fields(config: Any) -> tuple[str, dict[str, Any]]:
    """``(method name, fields)`` from a ``MethodConfig``, a dict with ``method``, or a name.

    ``fields``: the method's :attr:`MethodModel.fields` (given values over the config class's
    defaults), then ``modules_to_save`` when given."""
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
    model = memory_model(name)
    config_cls = get_method(name).config_cls
    defaults = config_cls().to_dict()
    unknown = [k for k in model.fields if k not in defaults]
    if unknown:
        raise ValueError(
            f"method {name!r}: MODELS fields {unknown} are not fields of "
            f"{config_cls.__name__}; name fields of the config class"
        )
    read = {k: defaults[k] for k in model.fields}
    return name, {
        **read,
        **{k: v for k, v in given.items() if k in read or k == "modules_to_save"},
    }


def plan(arch: Architecture, config: Any) -> MethodPlan:
    """The :class:`MethodPlan` of ``config`` (a config, dict or method name) on ``arch``: the
    method's memory plan, with ``mergeable`` from its config class."""
    name, f = method_fields(config)
    p = memory_model(name).plan(arch, f)
    p.mergeable = get_method(name).config_cls.mergeable
    return p
