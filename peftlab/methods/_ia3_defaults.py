"""Which layers IA³ adapts when ``target_modules`` is None.

For a ``model_type`` in :data:`DEFAULTS` (peft 0.21's table, so adapters made from defaults
are interchangeable with peft's) the table decides. For any other architecture the same choice
is read from the model itself, block by block (:func:`structural_modules`): the attention's key
and value projections (or its fused query-key-value projection, where one layer computes all
three) and the feed-forward output projection, found as the bottleneck adapters find it (the
single linear layer outside attention that maps another width back to the hidden size). The
result is a list of qualified layer names, written into the saved config as peft needs them.
"""

from __future__ import annotations

from torch import nn

from peftlab.core.config import ConfigError

_LLAMA = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QV_DOWN = (("q_proj", "v_proj", "down_proj"), ("down_proj",))
_BERT = (("key", "value", "output.dense"), ("output.dense",))
_FUSED_4H = (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",))
DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _QV_DOWN,
    "qwen3": _QV_DOWN,
    "gemma": _QV_DOWN,
    "gemma2": _QV_DOWN,
    "gemma3_text": _QV_DOWN,
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": _BERT,
    "roberta": _BERT,
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "gpt_neox": _FUSED_4H,
    "falcon": _FUSED_4H,
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
}
"""``model_type`` → (target modules, feed-forward modules), as peft 0.21's IA³ tables."""

KEY_VALUE = frozenset(
    {"k_proj", "v_proj", "key", "value", "k", "v", "key_proj", "value_proj", "k_lin", "v_lin"}
)
"""Names of separate key/value projections inside an attention module."""
FUSED_QKV = frozenset({"query_key_value", "qkv_proj", "c_attn", "Wqkv", "qkv", "in_proj"})
"""Names of one projection computing queries, keys and values together."""


def structural_modules(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(targets, feedforward)`` as qualified names read from ``model``'s blocks, or None when
    some block has no key/value (or fused) projection or no single feed-forward output."""
    from peftlab.methods.adapter import block_outputs, hidden_size, transformer_blocks

    hidden = hidden_size(model)
    if hidden is None:
        return None
    targets: list[str] = []
    feedforward: list[str] = []
    for name, children, linears in transformer_blocks(model):
        attn_out, ffn_out = block_outputs(children, linears, hidden)
        attention = attn_out[0].split(".")[0] if attn_out else None
        inside = [n for n, _, _ in linears if attention and n.startswith(attention + ".")]
        own = [n for n in inside if n.rsplit(".", 1)[-1] in KEY_VALUE]
        own = own or [n for n in inside if n.rsplit(".", 1)[-1] in FUSED_QKV]
        if not own or len(ffn_out) != 1:
            return None
        targets += [f"{name}.{n}" for n in own + ffn_out]
        feedforward.append(f"{name}.{ffn_out[0]}")
    return (tuple(targets), tuple(feedforward)) if targets else None


def default_modules(
    model_type: str | None, key: str, model: nn.Module | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(targets, feedforward)`` defaults for ``model_type`` (or read from ``model``'s
    structure for a type the table lacks); ``key`` is the option left None.

    Raises:
        ConfigError: no table entry, and no model or none of its blocks could be read.
    """
    if model_type in DEFAULTS:
        return DEFAULTS[model_type]
    found = structural_modules(model) if model is not None else None
    if found is None:
        raise ConfigError(
            f"{key}=None is invalid: IA³ has no default for model_type {model_type!r} (it has "
            f"{', '.join(DEFAULTS)}, and reads key/value and feed-forward output projections "
            f"from other models' blocks, which found none here); pass {key} explicitly"
        )
    return found
