"""P-Tuning v2 (Liu et al. 2022, https://arxiv.org/abs/2110.07602): deep prompts on every layer.

    K_l = [P_l^K ; W_K·h],   V_l = [P_l^V ; W_V·h]   for every layer l

The mechanism is Prefix-Tuning's (:mod:`peftlab.methods.prefix`, reused, not copied); what
P-Tuning v2 changes is the recipe: the prompts are trained directly, without the
reparameterization MLP (the paper finds its benefit depends on the task and data set, so it is
an option, off by default), and for classification the model's new head trains with them —
``modules_to_save`` defaults to the head of a ``*ForSequenceClassification`` model. This is the "deep" variant; the input-only soft
prompt that is sometimes called P-Tuning v2 is :mod:`peftlab.methods.prompt`.
"""

from __future__ import annotations

import dataclasses

from peftlab.core.registry import VIRTUAL_TOKEN_LRS, Tuning
from peftlab.methods.prefix import PrefixTuningConfig, register_prefix_method


@dataclasses.dataclass(frozen=True)
class PTuningV2Config(PrefixTuningConfig):
    """Deep prompts on every layer, trained directly (Liu et al. 2022)."""

    num_virtual_tokens: int = 20
    """Prompt length p on every layer (the paper uses 4–64 for classification)."""
    reparam: bool = False
    """Produce the prompts with an MLP while training (the paper's optional "reparameterization";
    off by default, as the paper recommends for most NLU tasks)."""


register_prefix_method(
    "ptuning-v2",
    PTuningV2Config,
    "peftlab_ptuning",
    "ptuning_",
    Tuning(1e-2, {"lr": VIRTUAL_TOKEN_LRS, "num_virtual_tokens": (10, 20, 50)}),
)
