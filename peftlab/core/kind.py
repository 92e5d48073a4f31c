"""The model kind: what a model is trained to predict, which decides its data and its loss.

- ``"causal-lm"``: a decoder with a language-model head; every token predicts the next one
  (labels ``[B, T]``, -100 on the prompt and padding).
- ``"classification"``: an encoder (or any ``*ForSequenceClassification`` model) with a
  sequence-classification head; one label per example (labels ``[B]``).

The rule, the same for a config on disk and for a loaded model:

1. an architecture (class) name containing ``ForSequenceClassification`` → classification;
2. one containing ``ForCausalLM`` → causal-lm;
3. otherwise an encoder-only ``model_type`` (:data:`ENCODER_TYPES`) → classification, since
   peftlab trains an encoder only with a new classification head;
4. anything else → causal-lm.

:func:`kind_from_config` applies it to a config's ``architectures`` and ``model_type``;
:func:`kind_of_model` to a loaded model, whose class name is its architecture.
``peftlab.models.model_kind`` adds bundled names and paths on top.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from peftlab.core.config import check

ModelKind = Literal["causal-lm", "classification"]
"""What a model predicts; configs and result JSON carry these exact strings."""

CAUSAL_LM: ModelKind = "causal-lm"
CLASSIFICATION: ModelKind = "classification"
KINDS: tuple[ModelKind, ...] = get_args(ModelKind)

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert"})
"""``model_type`` values of encoder-only models: without a telling architecture name, such a
model is loaded for classification."""


def kind_from_config(architectures: Iterable[str] | None, model_type: str | None) -> ModelKind:
    """The kind of a model described by its config's ``architectures`` and ``model_type``.

    Args:
        architectures: class names (``config.architectures``); None or empty when unknown.
        model_type: ``config.model_type``; None when unknown.
    """
    archs = list(architectures or ())
    if any("ForSequenceClassification" in a for a in archs):
        return CLASSIFICATION
    if any("ForCausalLM" in a for a in archs):
        return CAUSAL_LM
    return CLASSIFICATION if model_type in ENCODER_TYPES else CAUSAL_LM


def kind_of_model(model: object) -> ModelKind:
    """The kind of a loaded model: its class is its architecture (the saved config's
    ``architectures`` may name another head, e.g. ``BertModel`` under a new classifier)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return kind_from_config([type(model).__name__], model_type)


def check_kind(kind: object) -> ModelKind:
    """``kind`` itself if it is a :data:`ModelKind`; otherwise a one-line ConfigError."""
    check(kind in KINDS, "kind", kind, " or ".join(repr(k) for k in KINDS))
    return kind  # type: ignore[return-value]
