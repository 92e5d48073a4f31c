"""Full fine-tuning: every parameter trains. The baseline every PEFT method is measured against."""

from __future__ import annotations

import dataclasses

from torch import nn

from peftlab.core.config import MethodConfig
from peftlab.core.registry import MethodProfile, MethodSpec, register_method


@dataclasses.dataclass(frozen=True)
class FullFinetuneConfig(MethodConfig):
    """Train all parameters of the model (no adapter; the "adapter" file is the full weights)."""

    mergeable = True

    freeze_embeddings: bool = False
    """Keep the input embeddings (and a tied output head) frozen; saves their optimizer state."""


def _apply(model: nn.Module, config: FullFinetuneConfig, adapter_name: str) -> None:
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)


def _memory_plan(arch, f: dict):
    """The memory estimator's closed form: every base parameter trains (the input embedding
    stays frozen with ``freeze_embeddings``)."""
    from peftlab.select.methods import MethodPlan

    frozen = arch.vocab * arch.hidden if f["freeze_embeddings"] else 0
    return MethodPlan(
        "full",
        arch.total_params() - frozen,
        dict.fromkeys(arch.linear_shapes(), 0),
        head_trainable=True,
        norms_trainable=True,
        embeddings_trainable=not f["freeze_embeddings"],
        trains_base=True,
    )


register_method(
    MethodSpec(
        "full",
        FullFinetuneConfig,
        _apply,
        param_prefix="",
        memory_plan=_memory_plan,
        memory_fields=("freeze_embeddings",),
        profile=MethodProfile(
            quality={"generation": 1.00, "classification": 1.00, "multi-task": 0.95},
            speed=0.75,
            overhead=0.0,
            inference="none (a new full model)",
        ),
    )
)
