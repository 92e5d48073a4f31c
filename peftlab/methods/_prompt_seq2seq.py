"""Prompt tuning on encoder-decoder models (T5, BART): the soft prompt goes in front of the
*encoder's* input, as in Lester et al. 2021 (§2, on T5), and the decoder cross-attends to it.

    encoder input  X' = [P ; E·x],   mask m' = [1_p ; m]

Two hooks keep the two masks in step. The encoder's pre-hook prepends the prompt to its
embeddings and, when the mask it receives still has the real input's length, extends it. The
model's pre-hook extends the ``attention_mask`` the model hands to the decoder as its
cross-attention mask: always when the model will run its encoder itself, and, when
``encoder_outputs`` are given (``generate()`` runs the encoder once, then the model per new
token), when the mask is exactly p shorter than those outputs. Encoder outputs keep the p
prompt positions (the decoder reads them); logits and labels are the decoder's, unchanged.
This is peft's ``PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1)``
(tests/unit/test_architecture_reach.py checks logits and generation against it).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.methods._virtual_tokens import bind_call, forward_params


def encoder_of(model: nn.Module) -> nn.Module:
    """The model's encoder stack, which must take ``inputs_embeds``."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    if encoder is None or "inputs_embeds" not in forward_params(encoder).parameters:
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model whose encoder takes no "
            f"inputs_embeds, so a soft prompt cannot be put in front of its input"
        )
    return encoder


def _extended(mask: torch.Tensor, p: int) -> torch.Tensor:
    if mask.dim() != 2:
        raise ConfigError(
            f"prompt tuning extends a 2-D attention mask [batch, seq]; got shape "
            f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask"
        )
    return torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)


def encoder_pre_hook(
    prompt: nn.Parameter, sig: inspect.Signature, encoder: nn.Module, args: tuple, kwargs: dict
):
    """Prepend ``prompt`` ``[p, d]`` to the encoder's input embeddings (and its mask);
    ``sig`` is the encoder's forward signature."""
    kw = bind_call(sig, args, kwargs)
    embeds = kw.get("inputs_embeds")
    if embeds is None:
        table = getattr(encoder, "embed_tokens", None) or encoder.get_input_embeddings()
        embeds = table(kw["input_ids"])
    batch, length, p = embeds.shape[0], embeds.shape[1], prompt.shape[0]
    front = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    kw["inputs_embeds"] = torch.cat([front, embeds], dim=1)
    kw["input_ids"] = None
    mask = kw.get("attention_mask")
    if mask is not None and mask.shape[-1] == length:  # not yet extended by the model's hook
        kw["attention_mask"] = _extended(mask, p)
    return (), kw


def model_pre_hook(p: int, sig: inspect.Signature, model: nn.Module, args: tuple, kwargs: dict):
    """Extend the mask the model gives the decoder for cross-attention to the prompt; ``sig``
    is the model's forward signature."""
    kw = bind_call(sig, args, kwargs)
    mask = kw.get("attention_mask")
    if mask is None:
        return None
    outputs = kw.get("encoder_outputs")
    if outputs is not None:
        states = outputs[0] if isinstance(outputs, tuple | list) else outputs.last_hidden_state
        if mask.shape[-1] + p != states.shape[1]:
            return None  # already extended, or not this prompt's encoder outputs
    kw["attention_mask"] = _extended(mask, p)
    return (), kw
