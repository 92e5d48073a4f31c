"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): a soft prompt on the input.

    X' = [P ; E·x],   P ∈ R^{p×d} trainable,  E the frozen input embeddings

Only the input sequence changes; every layer's keys/values come from the frozen model. This is
the *shallow* variant — the one the user's document calls "P-Tuning v2" — kept so it can be
compared with the real deep one (:mod:`peftlab.methods.ptuning_v2`).

A forward pre-hook on the transformer body embeds ``input_ids``, prepends the prompt, and
extends ``attention_mask``, ``token_type_ids`` and given ``position_ids``; a forward hook
removes the p prompt positions from the body's outputs again, so logits, labels and losses
keep the shape of the real input (BERT's pooler is re-read from [CLS]). In ``generate()`` the
prompt is prepended on the first step and lives in the KV cache afterwards. The prompt is
initialised from randomly sampled vocabulary embeddings (the paper's "sampled vocab" init,
which trains far better than a N(0, 1) start).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig
from peftlab.core.registry import (
    VIRTUAL_TOKEN_LRS,
    VIRTUAL_TOKENS,
    MethodSpec,
    Tuning,
    register_method,
)
from peftlab.methods import _prompt_seq2seq as _seq2seq
from peftlab.methods._token_init import TokenInit, embeddings_of
from peftlab.methods._virtual_tokens import (
    VirtualTokenModule,
    bind_call,
    check_num_virtual_tokens,
    forward_params,
    is_encoder_decoder,
    record_virtual_tokens,
    transformer_body,
    virtual_tokens_in,
)

ATTR = "peftlab_prompt"


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(TokenInit, MethodConfig):
    """A trainable soft prompt in front of the input embeddings (Lester et al. 2021)."""

    preserves_output_at_init = False

    num_virtual_tokens: int = 20
    """Soft-prompt length p (the paper uses 1–150; 20 is a common choice)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_virtual_tokens(self.num_virtual_tokens)
        self.check_init()


class PromptEncoder(VirtualTokenModule):
    """Soft prompts of every adapter (``prompt_embeddings[name]``, ``[p, d]``) and the hooks."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__(owner)
        self.prompt_embeddings = nn.ParameterDict()
        self._strip = 0  # prompt positions the pending forward call prepended
        if is_encoder_decoder(owner):  # the prompt goes on the encoder's input
            encoder = _seq2seq.encoder_of(owner)
            self.signature, self.model_signature = forward_params(encoder), forward_params(owner)
            encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True)
            owner.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)
            return
        body = transformer_body(owner)
        self.signature = forward_params(body)
        if "inputs_embeds" not in self.signature.parameters:
            raise ConfigError(
                f"{type(body).__name__}.forward takes no inputs_embeds, so a soft prompt cannot be "
                f"put in front of the input; use a transformers model that accepts inputs_embeds"
            )
        names = [n for n in ("cache", "past_key_values") if n in self.signature.parameters]
        self.cache_arg = names[0] if names else None
        body.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        body.register_forward_hook(self._post_hook)
        self.guard(body)

    def add(self, name: str, config: PromptTuningConfig) -> None:
        table = self._owner.get_input_embeddings().weight
        with torch.no_grad():
            if config.init != "random":  # the embeddings of real tokens (§3.2, "sampled vocab")
                init = embeddings_of(
                    self._owner, config.init_ids(self._owner, config.num_virtual_tokens)
                )
            else:
                std = table.float().std().item()
                init = (
                    torch.randn(config.num_virtual_tokens, table.shape[1], device=table.device)
                    * std
                )
        self.prompt_embeddings[name] = nn.Parameter(init)

    def _encoder_pre_hook(self, encoder: nn.Module, args: tuple, kwargs: dict):
        name = self.active()
        if name not in self.prompt_embeddings:
            return None
        prompt = self.prompt_embeddings[name]
        return _seq2seq.encoder_pre_hook(prompt, self.signature, encoder, args, kwargs)

    def _model_pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        name = self.active()
        if name not in self.prompt_embeddings:
            return None
        p = self.prompt_embeddings[name].shape[0]
        return _seq2seq.model_pre_hook(p, self.model_signature, model, args, kwargs)

    def _pre_hook(self, body: nn.Module, args: tuple, kwargs: dict):
        self._strip = 0
        self.reached()
        name = self.active()
        if name not in self.prompt_embeddings:
            return None
        kw = bind_call(self.signature, args, kwargs)
        cache = kw.get(self.cache_arg) if self.cache_arg else None
        if cache is None:
            cache = kw.get("past_key_values")
        prompt = self.prompt_embeddings[name]
        p = prompt.shape[0]
        if cache is not None and cache.get_seq_length() > 0:
            # A decoding step: the prompt is already in the cache (put there by the first step).
            if virtual_tokens_in(cache) != p:
                raise ConfigError(
                    "the cache passed in holds tokens but not this soft prompt; start decoding "
                    "from an empty cache (or None) so the prompt is put in front"
                )
            shift = p
        else:
            embeds = kw.get("inputs_embeds")
            if embeds is None:
                embeds = body.get_input_embeddings()(kw["input_ids"])
            batch = embeds.shape[0]
            front = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kw["inputs_embeds"] = torch.cat([front, embeds], dim=1)  # (B, p + T, d)
            kw["input_ids"] = None
            if kw.get("token_type_ids") is not None:
                types = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([types.new_zeros(batch, p), types], dim=1)
            position_ids = kw.get("position_ids")
            if position_ids is not None:
                lead = torch.arange(p, device=position_ids.device).expand(
                    *position_ids.shape[:-1], p
                )
                kw["position_ids"] = torch.cat([lead, position_ids + p], dim=-1)
            if cache is not None:
                record_virtual_tokens(cache, p)
            self._strip = p
            shift = 0
        if shift and kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + shift
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ConfigError(
                    f"prompt tuning extends a 2-D attention mask [batch, seq]; got shape "
                    f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask"
                )
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        return (), kw

    def _post_hook(self, body: nn.Module, args: tuple, output):
        p, self._strip = self._strip, 0
        cache = getattr(output, self.cache_arg or "", None)
        if p and cache is not None and virtual_tokens_in(cache) is None:
            record_virtual_tokens(cache, p)  # a cache the model created itself, prompt included
        if not p:
            return None
        output.last_hidden_state = output.last_hidden_state[:, p:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
        pooler = getattr(body, "pooler", None)
        if getattr(output, "pooler_output", None) is not None and callable(pooler):
            output.pooler_output = pooler(output.last_hidden_state)
        return output


def _apply(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> None:
    encoder = model._modules.get(ATTR)
    if encoder is None:
        encoder = PromptEncoder(model)
        model.add_module(ATTR, encoder)
    encoder.add(adapter_name, config)


def _unload(model: nn.Module) -> None:
    encoder = model._modules.get(ATTR)
    if encoder is not None:
        encoder.remove_hooks()
        del model._modules[ATTR]


register_method(
    MethodSpec(
        "prompt",
        PromptTuningConfig,
        _apply,
        param_prefix="prompt_",
        unload=_unload,
        exclusive=VIRTUAL_TOKENS,
        tuning=Tuning(1e-2, {"lr": VIRTUAL_TOKEN_LRS, "num_virtual_tokens": (10, 20, 50)}),
    )
)
