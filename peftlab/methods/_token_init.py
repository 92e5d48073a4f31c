"""Virtual tokens initialized from the model itself (prompt tuning, Prefix-Tuning, P-Tuning v2).

A table of N(0, 1) entries is far outside what a pretrained model's layers ever see: on
SmolLM2-135M a 20-token N(0, 1) key/value prefix raises the step-0 loss of a built-in task
from 1.20 to 5.37 (+348%), and training first has to undo that. Initializing from the model
keeps step 0 close to the base model:

- **prompt tuning** (Lester et al. 2021, §3.2 "sampled vocab"): the input embeddings of ``p``
  token ids;
- **Prefix-Tuning / P-Tuning v2** (Li & Liang 2021, §7.2: "initializing the prefix with
  activations of real words"): the keys and values every layer computes for ``p`` real token
  ids, i.e. the model's own cache after reading them.

The ids are either ``init_text`` tokenized (repeated to length ``p``) or ``p`` ids sampled
uniformly, with a fixed generator, from the vocabulary less the special ids the config
names. Measured on SmolLM2-135M, ``builtin:sort``, 16 evaluation examples, p = 20 (a /tmp
script; the test ``tests/integration/test_token_init_smollm2.py`` checks the bound): sampled-
vocabulary keys/values −5.5% loss at step 0, a task sentence −19.6%, N(0, 1) +348%.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from peftlab.core.config import ConfigError, check

INIT_CHOICES = ("vocab", "text", "random")


@dataclasses.dataclass(frozen=True)
class TokenInit:
    """The init options every virtual-token config shares (a mixin of the config classes)."""

    init: str = "vocab"
    """How the virtual tokens start: "vocab" (from the model, for p randomly sampled vocabulary
    tokens), "text" (from the model, for the tokens of ``init_text``) or "random" (N(0, 1)
    tables as peft and the papers' code do; embedding-scaled normal for prompt tuning)."""
    init_text: str | None = None
    """Text whose tokens initialize the virtual tokens with ``init="text"`` (repeated or cut
    to ``num_virtual_tokens``), e.g. a task description."""
    init_token_ids: list[int] | None = None
    """The token ids of ``init_text``; filled in from the tokenizer by ``peftlab train``
    (``config.with_tokenizer(tokenizer)``), or given directly."""

    def check_init(self) -> None:
        check(self.init in INIT_CHOICES, "init", self.init, '"vocab", "text" or "random"')
        if self.init == "text":
            check(
                bool(self.init_text) or bool(self.init_token_ids),
                "init_text",
                self.init_text,
                'a non-empty text when init="text"',
            )
        if self.init_token_ids is not None:
            check(
                len(self.init_token_ids) > 0 and all(i >= 0 for i in self.init_token_ids),
                "init_token_ids",
                self.init_token_ids,
                "a non-empty list of token ids (non-negative integers)",
            )

    def with_tokenizer(self, tokenizer: Any):
        if self.init != "text" or self.init_token_ids or not self.init_text:
            return self
        ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text={self.init_text!r} tokenizes to no tokens")
        return dataclasses.replace(self, init_token_ids=list(ids))

    def init_ids(self, model: nn.Module, n: int) -> list[int]:
        """The ``n`` token ids to initialize from ("vocab" and "text")."""
        if self.init == "text" and not self.init_token_ids:
            raise ConfigError(
                'init="text" needs init_text tokenized: pass config.with_tokenizer(tokenizer) '
                "to peftlab.apply (peftlab train does this), or give init_token_ids"
            )
        vocab = model.get_input_embeddings().weight.shape[0]
        if self.init_token_ids and max(self.init_token_ids) >= vocab:
            raise ConfigError(
                f"init_token_ids holds id {max(self.init_token_ids)}, outside the model's "
                f"vocabulary of {vocab}"
            )
        return token_ids(model, n, self.init_token_ids if self.init == "text" else None)


def token_ids(model: nn.Module, n: int, init_token_ids=None, seed: int = 0) -> list[int]:
    """``n`` token ids: ``init_token_ids`` repeated/cut to ``n``, or sampled from the
    vocabulary (special ids of the model's config left out) with a generator seeded by
    ``seed``."""
    if init_token_ids:
        ids = list(init_token_ids)
        return (ids * (n // len(ids) + 1))[:n]
    vocab = model.get_input_embeddings().weight.shape[0]
    cfg = getattr(model, "config", None)
    special = {getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {
        None
    }
    special = {i for s in special for i in (s if isinstance(s, list | tuple) else [s])}
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n:
        for i in torch.randint(0, vocab, (n,), generator=g).tolist():
            if i not in special and len(out) < n:
                out.append(i)
    return out


@torch.no_grad()
def embeddings_of(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """``[len(ids), d]`` input embeddings (float32 copies)."""
    table = model.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].float().clone()


@torch.no_grad()
def keys_values_of(body: nn.Module, ids: list[int], cache_arg: str) -> torch.Tensor:
    """``[p, L·2·n_kv·d_head]``: per layer, the keys then the values the transformer ``body``
    computes for ``ids`` (the layout of peftlab's and peft's prefix table).

    The body must run *without* the prefix being initialized (the caller adds the adapter
    after this), so what it returns is the base model's own cache."""
    from transformers import DynamicCache

    device = next(body.parameters()).device
    cache = DynamicCache(config=getattr(body, "config", None))
    was_training = body.training
    body.eval()
    try:
        body(input_ids=torch.tensor([ids], device=device), use_cache=True, **{cache_arg: cache})
    finally:
        body.train(was_training)
    cols = []
    for layer in cache.layers:
        k, v = layer.keys[0], layer.values[0]  # (n_kv, p, d_head)
        p = k.shape[1]
        cols += [k.permute(1, 0, 2).reshape(p, -1), v.permute(1, 0, 2).reshape(p, -1)]
    return torch.cat(cols, dim=1).float()


@torch.no_grad()
def cache_geometry(body: nn.Module, cache_arg: str) -> tuple[int, int, int] | None:
    """``(layers, key/value heads, head size)`` of the cache the transformer ``body`` fills for
    one token — what the model itself uses, where configs disagree on how to say it (Falcon's
    multi-query attention keeps one key/value head whatever ``num_kv_heads`` reads).

    None when the probe cannot tell: no parameters, a meta-device model, a body that does not
    run on ``input_ids`` alone, or layers of different shapes (the config's figures are used)."""
    from transformers import DynamicCache

    weight = next(body.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return None
    cache = DynamicCache(config=getattr(body, "config", None))
    was_training = body.training
    body.eval()
    try:
        body(input_ids=torch.zeros(1, 1, dtype=torch.long, device=weight.device), use_cache=True,
             **{cache_arg: cache})  # fmt: skip
    except Exception:  # noqa: BLE001 - a best-effort probe; the caller falls back to the config
        return None
    finally:
        body.train(was_training)
    shapes = {
        (layer.keys.shape[1], layer.keys.shape[-1])
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4
    }
    if len(shapes) != 1 or len(cache.layers) == 0:
        return None
    heads, size = shapes.pop()
    return len(cache.layers), heads, size
