"""Prefix-Tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): trainable key/value
prefixes on every attention layer.

For layer l the keys and values attended over become

    K_l = [P_l^K ; W_K·h],   V_l = [P_l^V ; W_V·h],   P_l^K, P_l^V ∈ R^{n_kv × p × d_head}

so every real token can attend to p virtual tokens whose keys/values are free parameters. With
``reparam=True`` (the paper's training recipe, its code's ``control_trans``) the table is
produced by an MLP, P = W_2·tanh(W_1·E + b_1) + b_2 with E ∈ R^{p×d} an embedding; the MLP
only stabilises training, so :func:`fold_prefix` (and ``save_adapter``) replaces it with the
table it computes and inference carries no MLP.

How the prefixes get in: a forward pre-hook on the transformer body (``LlamaModel``,
``GPT2Model``, ``BertModel``) passes a transformers ``DynamicCache`` pre-filled with the
prefixes and extends ``attention_mask`` by p ones on the left, so the model class is unchanged.
Prefixes are shaped by ``num_key_value_heads`` (grouped-query attention). Real tokens keep the
positions they would have without the prefix (the virtual tokens have none); this is what
``generate()`` computes from the attention mask, and keeps an absolute-position model (BERT,
GPT-2) at the positions it was trained with.

Training uses a *read-only* prefix cache whose ``update`` returns prefix ⊕ new keys without
storing them, so a layer recomputed by gradient checkpointing sees the same keys;
transformers' checkpointed layers drop a cache unless ``_can_checkpoint_with_cache`` is set,
which is exactly the case it documents ("layers that only read the KV cache"), so the hook sets
it for read-only calls. ``generate()`` gets a normal growing ``DynamicCache`` whose first p
entries are the prefixes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftlab.core.config import ConfigError, MethodConfig, check
from peftlab.core.registry import (
    PREFIX_MLP_LRS,
    VIRTUAL_TOKENS,
    MethodSpec,
    Tuning,
    register_method,
)
from peftlab.core.state import active_adapters, adapter_configs, replace_config
from peftlab.methods._token_init import TokenInit, cache_geometry, keys_values_of
from peftlab.methods._virtual_tokens import (
    VirtualTokenModule,
    bind_call,
    check_not_encoder_decoder,
    check_num_virtual_tokens,
    forward_params,
    record_virtual_tokens,
    transformer_body,
    virtual_tokens_in,
)


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(TokenInit, MethodConfig):
    """Trainable key/value prefixes on every layer (Li & Liang 2021)."""

    preserves_output_at_init = False

    num_virtual_tokens: int = 20
    """Prefix length p: virtual tokens whose keys/values every layer attends to."""
    reparam: bool = True
    """Produce the prefixes with an MLP (embedding → Linear → Tanh → Linear) while training, as
    the paper does for stability; folded into a plain table when saved."""
    reparam_hidden: int = 512
    """Hidden width of the reparameterization MLP."""
    dropout: float = 0.0
    """Dropout on the prefix keys/values while training, in [0, 1) (P-Tuning v2 uses 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_virtual_tokens(self.num_virtual_tokens)
        check(
            self.reparam_hidden > 0,
            "reparam_hidden",
            self.reparam_hidden,
            "a positive integer, e.g. 512",
        )
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1), e.g. 0.1")
        self.check_init()


class _PrefixOnlyCache(DynamicCache):
    """A cache holding only the prefixes: ``update`` returns prefix ⊕ new keys/values without
    storing the new ones, so one forward (and its checkpointed recompute) can reuse it."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        keys = torch.cat([layer.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([layer.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(type(m), "gradient_checkpointing")]


class PrefixEncoder(VirtualTokenModule):
    """The prefixes of every adapter of one model, and the hook that feeds them in.

    Adapter ``name`` owns ``<tag>table[name]`` (``[p, L·2·n_kv·d_head]``, the layout peft's
    prefix encoder uses), or while reparameterized ``<tag>embedding[name]`` (``[p, d]``) and
    ``<tag>mlp[name]``. ``tag`` is the method's parameter prefix ("prefix_", "ptuning_").
    """

    def __init__(self, owner: nn.Module, tag: str) -> None:
        check_not_encoder_decoder(owner)
        super().__init__(owner)
        self.tag = tag
        body = transformer_body(owner)
        sig = forward_params(body)
        names = [n for n in ("cache", "past_key_values") if n in sig.parameters]
        cfg = getattr(owner, "config", None)
        if not names or cfg is None:
            raise ConfigError(
                f"{type(owner).__name__} cannot take prefixes: its {type(body).__name__}.forward "
                f"accepts no key/value cache (`cache`/`past_key_values`), which prefix methods feed "
                f"the per-layer prefixes through. Use a transformers model with cache-capable "
                f"attention (Llama, GPT-2, BERT, ...), or the input-only method 'prompt'"
            )
        self.cache_arg = names[0]
        self.signature = sig
        text = cfg.get_text_config(decoder=True)
        heads = text.num_attention_heads
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.hidden_size = text.hidden_size
        probed = cache_geometry(body, self.cache_arg)
        if probed is not None:
            self.num_layers, self.num_kv_heads, self.head_dim = probed
        kinds = {type(layer).__name__ for layer in DynamicCache(config=cfg).layers}
        if kinds - {DynamicLayer.__name__}:
            raise ConfigError(
                f"{type(owner).__name__} has non-full attention layers ({sorted(kinds)}): a "
                f"sliding-window or linear-attention cache would evict or ignore the prefix. "
                f"Prefix methods need full attention on every layer; use 'prompt' or 'lora'"
            )
        self.add_module(tag + "table", nn.ParameterDict())
        self.add_module(tag + "embedding", nn.ParameterDict())
        self.add_module(tag + "mlp", nn.ModuleDict())
        self.configs: dict[str, PrefixTuningConfig] = {}
        self.gc_layers = _checkpointed_layers(owner)
        self._restore_gc = False
        self._table_cache: dict[str, tuple] = {}
        """Adapter name → (parameter versions, the table they computed): see _inference_table."""
        body.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        body.register_forward_hook(self._post_hook)
        self.guard(body)

    def part(self, kind: str) -> nn.ParameterDict | nn.ModuleDict:
        return getattr(self, self.tag + kind)

    def add(self, name: str, config: PrefixTuningConfig, device: torch.device) -> None:
        p, width = (
            config.num_virtual_tokens,
            self.num_layers * 2 * self.num_kv_heads * self.head_dim,
        )
        # The model's own keys/values for real tokens (Li & Liang §7.2), computed before the
        # adapter exists so no prefix is in them; None: N(0, 1) as the papers' code does.
        real = None if config.init == "random" else self._real_table(config, p).to(device)
        if config.reparam:
            # As Li & Liang's code: nn.Embedding (N(0, 1)) → Linear → Tanh → Linear.
            embedding = torch.randn(p, self.hidden_size, device=device)
            mlp = nn.Sequential(
                nn.Linear(self.hidden_size, config.reparam_hidden),
                nn.Tanh(),
                nn.Linear(config.reparam_hidden, width),
            ).to(device)
            if real is not None:
                # Start the MLP at the real table: with H = tanh(W1·E + b1) ([p, hidden], rank p
                # for hidden ≥ p), W2ᵀ = pinv(H)·(table − b2) makes H·W2ᵀ + b2 = table.
                with torch.no_grad():
                    hidden = mlp[1](mlp[0](embedding)).float()
                    target = real - mlp[2].bias.float()
                    mlp[2].weight.copy_((torch.linalg.pinv(hidden) @ target).T)
            self.part("embedding")[name] = nn.Parameter(embedding)
            self.part("mlp")[name] = mlp
        else:
            # As P-Tuning v2's PrefixEncoder without projection: nn.Embedding.
            table = real if real is not None else torch.randn(p, width, device=device)
            self.part("table")[name] = nn.Parameter(table)
        self.configs[name] = config

    def _real_table(self, config: PrefixTuningConfig, p: int) -> torch.Tensor:
        from peftlab.core.model import disable_adapters

        ids = config.init_ids(self._owner, p)
        self._init_pending = True  # the hooks stay out of this call
        try:  # the base model's keys/values, whatever other adapters the model holds
            with disable_adapters(self._owner):
                return keys_values_of(transformer_body(self._owner), ids, self.cache_arg)
        finally:
            self._init_pending = False

    def layer_rows(self, name: str, layer: int) -> torch.Tensor:
        """Layer ``layer``'s slice of the table, ``[p, 2·n_kv·d_head]``.

        Computed per layer, each slice with its own autograd graph: reentrant gradient
        checkpointing runs one backward per layer, and a graph shared by all layers (one MLP
        call) would be freed by the first of them.
        """
        cols = self._columns(layer)
        if name in self.part("table"):
            return self.part("table")[name][:, cols]
        mlp = self.part("mlp")[name]
        hidden = mlp[1](mlp[0](self.part("embedding")[name]))
        return nn.functional.linear(hidden, mlp[2].weight[cols], mlp[2].bias[cols])

    def _columns(self, layer: int) -> slice:
        """Layer ``layer``'s columns of a ``[p, L·2·n_kv·d_head]`` table."""
        width = 2 * self.num_kv_heads * self.head_dim
        return slice(layer * width, (layer + 1) * width)

    def table(self, name: str) -> torch.Tensor:
        """The prefix table of adapter ``name``, ``[p, L·2·n_kv·d_head]``."""
        if name in self.part("table"):
            return self.part("table")[name]
        # Assembled from the same per-layer computation the forward uses, so a folded table
        # reproduces the unfolded outputs bit for bit.
        return torch.cat([self.layer_rows(name, i) for i in range(self.num_layers)], dim=1)

    def _inference_table(self, name: str) -> torch.Tensor | None:
        """Without autograd, the reparameterized table computed once and reused until a
        parameter changes (keyed on their versions), so generating with an unfolded prefix
        costs what a folded one does; None for a plain table or when gradients flow."""
        if torch.is_grad_enabled() or name in self.part("table"):
            return None
        params = [*self.part("mlp")[name].parameters(), self.part("embedding")[name]]
        key = tuple((t.data_ptr(), t._version) for t in params)
        cache = self._table_cache
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, self.table(name))
        return cache[name][1]

    def layer_prefixes(self, name: str, batch: int, dtype: torch.dtype) -> list[tuple]:
        """Per layer ``(keys, values)``, each ``[batch, n_kv, p, d_head]``."""
        out = []
        table = self._inference_table(name)
        for i in range(self.num_layers):
            rows = table[:, self._columns(i)] if table is not None else self.layer_rows(name, i)
            if self.training and self.configs[name].dropout:
                rows = nn.functional.dropout(rows, self.configs[name].dropout)
            kv = rows.to(dtype).view(rows.shape[0], 2, self.num_kv_heads, self.head_dim)
            kv = kv.permute(1, 2, 0, 3)  # (2, n_kv, p, d_head)
            out.append((kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)))
        return out

    @torch.no_grad()
    def fold(self, name: str) -> bool:
        """Replace adapter ``name``'s MLP by the table it computes; False if already a table."""
        if name in self.part("table"):
            return False
        table = self.table(name).detach().clone()
        del self.part("mlp")[name]
        del self.part("embedding")[name]
        self.part("table")[name] = nn.Parameter(table)
        self.configs[name] = dataclasses.replace(self.configs[name], reparam=False)
        return True

    def _pre_hook(self, body: nn.Module, args: tuple, kwargs: dict):
        self.reached()
        name = self.active()
        if name not in self.configs or self.__dict__.get("_init_pending"):
            return None
        kw = bind_call(self.signature, args, kwargs)
        cache = kw.get(self.cache_arg)
        if self.cache_arg != "past_key_values":  # the pre-5.x name, still accepted
            alias = kw.pop("past_key_values", None)
            cache = alias if cache is None else cache
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if ref is None:
            return None  # let the model raise its own error
        batch, length = ref.shape[:2]
        dtype = self._owner.get_input_embeddings().weight.dtype
        p = self.configs[name].num_virtual_tokens
        read_only = False
        if cache is None:
            use_cache = kw.get("use_cache")
            use_cache = getattr(body.config, "use_cache", False) if use_cache is None else use_cache
            read_only = torch.is_grad_enabled() or not use_cache
            prefixes = self.layer_prefixes(name, batch, dtype)
            cache = (_PrefixOnlyCache if read_only else DynamicCache)(ddp_cache_data=prefixes)
            record_virtual_tokens(cache, p)
            past = 0
        elif isinstance(cache, _PrefixOnlyCache):
            raise ConfigError(
                "this cache came from a forward with gradients enabled and holds only the prefix, "
                "not the tokens; to continue decoding, run the first forward under torch.no_grad() "
                "with use_cache=True (or use generate())"
            )
        elif virtual_tokens_in(cache) is None:
            if cache.get_seq_length() != 0:
                raise ConfigError(
                    "the cache passed in already holds tokens but no prefix; start from an empty "
                    "cache (or None) so the prefix is put in front"
                )
            for i, (k, v) in enumerate(self.layer_prefixes(name, batch, dtype)):
                cache.update(k, v, i)
            record_virtual_tokens(cache, p)
            past = 0
        else:
            past = cache.get_seq_length() - virtual_tokens_in(cache)
        kw[self.cache_arg] = cache
        for layer in self.gc_layers:
            layer._can_checkpoint_with_cache = read_only
        if read_only and body.__dict__.get("gradient_checkpointing"):
            # Some bodies (GPT2Model) withhold the cache from their layers themselves when
            # checkpointing; their flag does nothing else (each layer checkpoints itself), so it
            # is lowered for this call and restored by the post-hook.
            body.gradient_checkpointing = False
            self._restore_gc = True
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ConfigError(
                    f"prefix methods extend a 2-D attention mask [batch, seq]; got shape "
                    f"{tuple(mask.shape)}. Pass the tokenizer's attention_mask"
                )
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if "position_ids" in self.signature.parameters and kw.get("position_ids") is None:
            # The positions the model would give these tokens without the prefix.
            kw["position_ids"] = torch.arange(past, past + length, device=ref.device).unsqueeze(0)
        return (), kw

    def _post_hook(self, body: nn.Module, args: tuple, output):
        if self._restore_gc:
            body.gradient_checkpointing, self._restore_gc = True, False


def _encoder(model: nn.Module, attr: str) -> PrefixEncoder | None:
    return model._modules.get(attr)


def make_apply(attr: str, tag: str):
    """The apply function of a prefix-style method whose module is ``model.<attr>``."""

    def apply(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> None:
        encoder = _encoder(model, attr)
        if encoder is None:
            encoder = PrefixEncoder(model, tag)
            model.add_module(attr, encoder)
        device = model.get_input_embeddings().weight.device
        encoder.add(adapter_name, config, device)

    return apply


def make_unload(attr: str):
    def unload(model: nn.Module) -> None:
        encoder = _encoder(model, attr)
        if encoder is None:
            return
        encoder.remove_hooks()
        for layer in encoder.gc_layers:
            layer.__dict__.pop("_can_checkpoint_with_cache", None)
        del model._modules[attr]

    return unload


def make_export(attr: str, tag: str):
    """Save the folded table (and a ``reparam=False`` config), leaving the model as it is."""

    def export(model: nn.Module, adapter_name: str) -> tuple[MethodConfig, dict]:
        encoder = _encoder(model, attr)
        config = adapter_configs(model)[adapter_name]
        tensors = dict(model.named_parameters())
        if adapter_name in encoder.part("table"):
            return config, tensors
        own = (f"{attr}.{tag}embedding.{adapter_name}", f"{attr}.{tag}mlp.{adapter_name}.")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(own)}
        with torch.no_grad():
            tensors[f"{attr}.{tag}table.{adapter_name}"] = encoder.table(adapter_name)
        return dataclasses.replace(config, reparam=False), tensors

    return export


def fold_prefix(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold the reparameterization MLP of prefix adapters into static tables, in place.

    Call it when training ends: the outputs are unchanged, the MLP and its embedding are gone,
    and the recorded config says ``reparam=False``. Folds every adapter unless ``adapter_name``
    is given. Works for every prefix-style method (``prefix``, ``ptuning-v2``).
    """
    encoders = [m for m in model.children() if isinstance(m, PrefixEncoder)]
    if not encoders:
        raise ConfigError("fold_prefix: the model carries no prefix adapter; apply one first")
    for encoder in encoders:
        for name in [adapter_name] if adapter_name else list(encoder.configs):
            if name not in encoder.configs:
                raise ConfigError(f"fold_prefix: no prefix adapter named {name!r}")
            if encoder.fold(name):
                replace_config(model, name, encoder.configs[name])
                encoder.part("table")[name].requires_grad_(name in active_adapters(model))
    return model


def register_prefix_method(
    name: str, config_cls: type, attr: str, tag: str, tuning: Tuning
) -> MethodSpec:
    return register_method(
        MethodSpec(
            name,
            config_cls,
            make_apply(attr, tag),
            param_prefix=tag,
            unload=make_unload(attr),
            export=make_export(attr, tag),
            tuning=tuning,
            exclusive=VIRTUAL_TOKENS,
        )
    )


register_prefix_method(
    "prefix",
    PrefixTuningConfig,
    "peftlab_prefix",
    "prefix_",
    Tuning(3e-4, {"lr": PREFIX_MLP_LRS, "num_virtual_tokens": (10, 20, 50)}),
)
