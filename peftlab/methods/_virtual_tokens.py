"""Machinery shared by the virtual-token methods (prefix, P-Tuning v2, prompt tuning).

These methods add no adapter layer: they change the *inputs* of the transformer body (its
``inputs_embeds``, ``cache``, ``attention_mask``, ``position_ids``) from a forward pre-hook on it,
so they work with the model class unchanged. Their parameters live in one extra module attached
to the model (``peftlab_prefix``, ``peftlab_prompt``, ...), which also owns the hooks; the
method's ``unload`` removes both.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from peftlab.core.config import ConfigError, check
from peftlab.core.model import held_adapters
from peftlab.core.state import active_adapters, adapters_disabled


def check_num_virtual_tokens(n: Any) -> None:
    check(
        isinstance(n, int) and not isinstance(n, bool) and n > 0,
        "num_virtual_tokens",
        n,
        "a positive integer (the number of virtual tokens), e.g. 20",
    )


def transformer_body(model: nn.Module) -> nn.Module:
    """The module that takes ``input_ids``/``inputs_embeds`` and runs the layers (LlamaModel,
    GPT2Model, BertModel, OPTDecoder).

    That is ``model.base_model``, or the innermost module below it that holds both the input
    embeddings and the transformer blocks and takes ``inputs_embeds``: OPT's heads call
    ``model.decoder`` directly, past OPTModel, so a hook on OPTModel would never run."""
    body = getattr(model, "base_model", model)
    if not callable(getattr(body, "forward", None)):
        raise ConfigError(f"{type(model).__name__} has no transformer body to attach to")
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    blocks: list[nn.Module | None] = []  # found once, only for a model that needs it
    while True:
        inner = [c for c in body.children() if _takes_embeds(c) and _holds(c, embeddings)]
        if len(inner) != 1:
            return body
        if not blocks:
            blocks.append(_block_list(body))
        if not _holds(inner[0], blocks[0]):
            return body
        body = inner[0]


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def check_not_encoder_decoder(model: nn.Module) -> None:
    """Prefixes here go into one stack's key/value cache; an encoder-decoder model (T5, BART)
    would need them in the encoder's, the decoder's and the cross-attention's, which the prefix
    methods do not build (prompt tuning does support these models: ``_prompt_seq2seq``).

    Raises:
        ConfigError: ``model.config.is_encoder_decoder``.
    """
    if is_encoder_decoder(model):
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model: prefix and ptuning-v2 support "
            f"decoder-only and encoder-only models; use 'prompt' or a layer method ('lora', "
            f"'ia3', 'dora', ...) on it"
        )


def _block_list(body: nn.Module) -> nn.Module | None:
    """The body's transformer blocks: its ``nn.ModuleList`` with the most parameters."""
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _holds(module: nn.Module, part: nn.Module | None) -> bool:
    return part is None or any(m is part for m in module.modules())


def _takes_embeds(module: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_params(module: nn.Module) -> inspect.Signature:
    return inspect.signature(module.forward)


def bind_call(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All arguments of one forward call by name (positional ones included, ``**kwargs`` flat)."""
    bound = sig.bind_partial(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


CACHE_ATTR = "peftlab_virtual_tokens"
"""The one attribute a virtual-token method sets on a transformers cache: how many virtual
tokens it holds in front of the real ones. It travels with the cache from one decoding call to
the next (and through the copies ``generate()`` makes), which a table kept elsewhere would not."""


def virtual_tokens_in(cache: Any) -> int | None:
    """How many virtual tokens this method put in ``cache`` (None: it did not fill it)."""
    return getattr(cache, CACHE_ATTR, None)


def record_virtual_tokens(cache: Any, n: int) -> None:
    """Note on ``cache`` that its first ``n`` positions are virtual tokens."""
    setattr(cache, CACHE_ATTR, n)


class VirtualTokenModule(nn.Module):
    """Base of the module a virtual-token method attaches to the model: keeps a plain (not
    registered) reference to the owning model and removes its own hooks."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the owner contains this module, not vice versa.
        object.__setattr__(self, "_owner", owner)

    def active(self) -> str | None:
        """This module's active adapter for this call, or None (adapters disabled, or none of
        its adapters active; ``set_adapter`` activates at most one virtual-token adapter)."""
        if adapters_disabled(self._owner):
            return None
        mine = held_adapters(self)
        return next((n for n in active_adapters(self._owner) if n in mine), None)

    def guard(self, body: nn.Module) -> None:
        """Make a forward of the owner that never reached ``body`` an error, not a silent run
        without the virtual tokens (a head that calls a module past the body's hooks)."""
        if body is self._owner:
            return
        self._owner.register_forward_pre_hook(self._reset_ran)
        self._owner.register_forward_hook(self._check_ran)

    def reached(self) -> None:
        """Called by the body's pre-hook: this forward goes through the body."""
        object.__setattr__(self, "_ran", True)

    def _reset_ran(self, owner: nn.Module, args: tuple) -> None:
        object.__setattr__(self, "_ran", False)

    def _check_ran(self, owner: nn.Module, args: tuple, output: Any) -> None:
        if self.__dict__.get("_ran", True) or self.active() is None:
            return
        raise ConfigError(
            f"{type(owner).__name__}.forward ran its layers without calling "
            f"{type(transformer_body(owner)).__name__}, where the virtual tokens are put in, so "
            f"the adapter had no effect; use a method that adapts layers ('lora', 'ia3') on this "
            f"model"
        )

    def remove_hooks(self) -> None:
        """Remove every hook this module registered (found by owner, so deep copies work)."""
        for module in self._owner.modules():
            for hooks, with_kwargs in (
                (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                (module._forward_hooks, module._forward_hooks_with_kwargs),
            ):
                for key in [k for k, f in hooks.items() if getattr(f, "__self__", None) is self]:
                    del hooks[key]
                    with_kwargs.pop(key, None)
