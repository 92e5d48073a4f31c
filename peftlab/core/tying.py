"""Tied input and output embeddings (``tie_word_embeddings``: SmolLM2, GPT-2) and merging.

An adapter on one of the two (LoRA on ``lm_head`` or on ``embed_tokens``) changes that one's
computation only; merging it would write the update into the shared tensor and so into the
other one too. Before a merge, :func:`untie_adapted_embeddings` gives the adapted one its own
copy, and the model's config then says the two are not tied, so a saved merged model keeps
both and computes what the adapted model did.
"""

from __future__ import annotations

from torch import nn


def untie_adapted_embeddings(model: nn.Module) -> None:
    """Give an adapted output head or input embedding its own weight before a merge: with
    tied embeddings (SmolLM2, GPT-2) a merge into one would write its update into the other
    too. The model's config then says the two are not tied, so a saved merged model keeps
    both."""
    get_out, get_in = (
        getattr(model, n, None) for n in ("get_output_embeddings", "get_input_embeddings")
    )
    if not (callable(get_out) and callable(get_in)):
        return
    head, embed = get_out(), get_in()
    if head is None or embed is None:
        return
    head_base, embed_base = (getattr(m, "base_layer", m) for m in (head, embed))
    if head_base.weight is not embed_base.weight:
        return
    if head is not head_base:  # an adapter layer wraps the head
        untied = head_base
    elif embed is not embed_base:
        untied = embed_base
    else:
        return
    untied.weight = nn.Parameter(embed_base.weight.detach().clone(), requires_grad=False)
    configs = [getattr(model, "config", None)]
    if hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for c in configs:
        if c is not None and hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
