"""Full fine-tuning: every parameter trains. The baseline every PEFT method is measured against."""

from __future__ import annotations

import dataclasses

from torch import nn

from peftlab.core.config import MethodConfig
from peftlab.core.registry import FULL_LRS, MethodSpec, Tuning, register_method


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


register_method(
    MethodSpec(
        "full",
        FullFinetuneConfig,
        _apply,
        param_prefix="",
        tuning=Tuning(5e-5, {"lr": FULL_LRS}),
    )
)
