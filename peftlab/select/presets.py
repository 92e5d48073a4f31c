"""Model architectures for the memory estimator: public presets, HF configs, bundled models.

The estimator needs only the shape of a model, never its weights: layers, hidden size, MLP
size, attention heads, key/value heads, vocabulary and whether the output head shares the
input embedding. Presets hold the numbers published in each model's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peftlab.core.config import ConfigError

LLAMA, BERT = "llama", "bert"
"""Block families the estimator models: ``llama`` (pre-norm RMSNorm, RoPE, gated SiLU MLP,
grouped-query attention: Llama, Mistral, Qwen2/3, SmolLM, OLMo, Gemma 1, Granite) and
``bert`` (post-norm LayerNorm, learned positions, GELU MLP, dropout, classification head)."""

BLOCKS = {LLAMA: "model.layers", BERT: "bert.encoder.layer"}
"""Where a family's blocks sit in its transformers model: block ``k``'s linear ``s`` is
``f"{BLOCKS[family]}.{k}.{s}"``, the name ``peftlab.core.matching`` matches targets against."""
INPUT_EMBEDDING = {LLAMA: "model.embed_tokens", BERT: "bert.embeddings.word_embeddings"}
"""Where a family's input embedding table sits (LoRA can target it by name)."""
QUERY_VALUE = {LLAMA: ["q_proj", "v_proj"], BERT: ["query", "value"]}
"""A family's query and value projections (LoRA's original targets)."""

_LLAMA_TYPES = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm3",
    "olmo",
    "olmo2",
    "gemma",
    "granite",
}
"""Gemma (GeGLU, a scaled embedding) and Granite (constant multipliers) save what a Llama
block saves (tests/unit/test_estimator_families.py: within 4% of autograd); Gemma 2 and 3 do
not (two more norms per block, soft-capped attention: 17-29% more than this model) and are
refused."""
_BERT_TYPES = {"bert", "roberta", "xlm-roberta"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The numbers of a transformer that decide its memory use."""

    name: str
    family: str
    """``"llama"`` or ``"bert"`` (see the module constants)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None
    """Defaults to hidden / heads."""
    qkv_bias: bool = False
    """Qwen2 puts a bias on q/k/v; BERT has a bias on every linear layer."""
    max_positions: int = 0
    """Learned position embeddings (BERT); 0 for rotary models."""
    type_vocab: int = 0
    num_labels: int = 0
    """Classification head outputs (BERT with a new head); 0 means a language-model head."""
    dropout: float = 0.0
    """Hidden and attention dropout in training (BERT: 0.1); dropout masks cost memory."""
    source: str = ""
    model_type: str = ""
    """transformers' ``model_type`` where known (a method's per-type defaults, IA³'s targets);
    "" means the family's own."""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """Per-layer linear layers as ``suffix → (in, out, has_bias)``, in peftlab's module names."""
        h, i, b = self.hidden, self.intermediate, self.qkv_bias
        if self.family == BERT:
            return {
                "attention.self.query": (h, h, True),
                "attention.self.key": (h, h, True),
                "attention.self.value": (h, h, True),
                "attention.output.dense": (h, h, True),
                "intermediate.dense": (h, i, True),
                "output.dense": (i, h, True),
            }
        return {
            "self_attn.q_proj": (h, self.q_dim, b),
            "self_attn.k_proj": (h, self.kv_dim, b),
            "self_attn.v_proj": (h, self.kv_dim, b),
            "self_attn.o_proj": (self.q_dim, h, False),
            "mlp.gate_proj": (h, i, False),
            "mlp.up_proj": (h, i, False),
            "mlp.down_proj": (i, h, False),
        }

    def outside_linears(self) -> dict[str, tuple[int, int, bool]]:
        """Linear layers after the blocks as ``qualified name → (in, out, has_bias)``: BERT's
        pooler and (with labels) classifier; a language model's LM head, tied or not."""
        h = self.hidden
        if self.family == BERT:
            pooler = {"bert.pooler.dense": (h, h, True)}
            return (
                {**pooler, "classifier": (h, self.num_labels, True)} if self.num_labels else pooler
            )
        return {"lm_head": (h, self.vocab, False)}

    def named_linears(self) -> dict[str, tuple[int, int, bool]]:
        """Every linear layer of the transformers model as ``qualified name → (in, out,
        has_bias)``: each block's (:meth:`linear_shapes`), then :meth:`outside_linears`."""
        prefix = BLOCKS[self.family]
        blocks = {
            f"{prefix}.{k}.{s}": shape
            for k in range(self.layers)
            for s, shape in self.linear_shapes().items()
        }
        return {**blocks, **self.outside_linears()}

    @property
    def classifier(self) -> str | None:
        """The name of a classification model's new head (None: a language model)."""
        return "classifier" if self.family == BERT and self.num_labels else None

    def classifier_params(self) -> int:
        """Parameters of :attr:`classifier` (0 without one)."""
        if self.classifier is None:
            return 0
        i, o, _ = self.outside_linears()[self.classifier]
        return i * o + o

    def layer_norm_params(self) -> int:
        """Norm parameters in one block (RMSNorm: weight; LayerNorm: weight and bias)."""
        return 2 * self.hidden if self.family == LLAMA else 4 * self.hidden

    def embedding_params(self) -> int:
        """Input embeddings (+ BERT's positions, token types and embedding LayerNorm)."""
        h = self.hidden
        if self.family == BERT:
            return (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h
        return self.vocab * h

    def head_params(self) -> int:
        """Parameters after the last block: final norm and an untied LM head, or BERT's
        pooler and classifier."""
        own = {
            n: shape
            for n, shape in self.outside_linears().items()
            if not (n == "lm_head" and self.tied_embeddings)  # the input embedding's weight
        }
        linears = sum(i * o + (o if bias else 0) for i, o, bias in own.values())
        return linears + (self.hidden if self.family == LLAMA else 0)  # Llama's final RMSNorm

    def linear_params(self) -> int:
        """Weights (and biases) of all block linear layers."""
        per = sum(i * o + (o if bias else 0) for i, o, bias in self.linear_shapes().values())
        return self.layers * per

    def total_params(self) -> int:
        return (
            self.embedding_params()
            + self.layers * self.layer_norm_params()
            + self.linear_params()
            + self.head_params()
        )


def _llama(name, layers, hidden, inter, heads, kv, vocab, tied, source, **kw) -> Architecture:
    return Architecture(
        name, LLAMA, layers, hidden, inter, heads, kv, vocab, tied, source=source, **kw
    )


PRESETS: dict[str, Architecture] = {
    a.name: a
    for a in [
        _llama(
            "llama-7b", 32, 4096, 11008, 32, 32, 32000, False, "huggyllama/llama-7b config.json"
        ),
        _llama(
            "llama-13b", 40, 5120, 13824, 40, 40, 32000, False, "huggyllama/llama-13b config.json"
        ),
        _llama(
            "llama-33b", 60, 6656, 17920, 52, 52, 32000, False, "huggyllama/llama-30b config.json"
        ),
        _llama(
            "llama-65b", 80, 8192, 22016, 64, 64, 32000, False, "huggyllama/llama-65b config.json"
        ),
        _llama(
            "llama-2-7b",
            32,
            4096,
            11008,
            32,
            32,
            32000,
            False,
            "meta-llama/Llama-2-7b-hf config.json",
        ),
        _llama(
            "llama-2-13b",
            40,
            5120,
            13824,
            40,
            40,
            32000,
            False,
            "meta-llama/Llama-2-13b-hf config.json",
        ),
        _llama(
            "llama-2-70b",
            80,
            8192,
            28672,
            64,
            8,
            32000,
            False,
            "meta-llama/Llama-2-70b-hf config.json",
        ),
        _llama(
            "llama-3-8b",
            32,
            4096,
            14336,
            32,
            8,
            128256,
            False,
            "meta-llama/Meta-Llama-3-8B config.json",
        ),
        _llama(
            "mistral-7b",
            32,
            4096,
            14336,
            32,
            8,
            32000,
            False,
            "mistralai/Mistral-7B-v0.1 config.json",
            model_type="mistral",
        ),
        _llama(
            "qwen2.5-7b",
            28,
            3584,
            18944,
            28,
            4,
            152064,
            False,
            "Qwen/Qwen2.5-7B config.json",
            qkv_bias=True,
            model_type="qwen2",
        ),
        _llama(
            "smollm2-135m",
            30,
            576,
            1536,
            9,
            3,
            49152,
            True,
            "HuggingFaceTB/SmolLM2-135M config.json",
        ),
        Architecture(
            "minilm-l6",
            BERT,
            6,
            384,
            1536,
            12,
            12,
            30522,
            False,
            max_positions=512,
            type_vocab=2,
            num_labels=2,
            dropout=0.1,
            source="sentence-transformers/all-MiniLM-L6-v2 config.json",
        ),
    ]
}


def from_hf_config(cfg: dict[str, Any], name: str = "custom") -> Architecture:
    """Architecture from a Hugging Face ``config.json`` dict (Llama-like or BERT-like)."""
    mtype = cfg.get("model_type", "")
    if mtype in _BERT_TYPES:
        archs = cfg.get("architectures") or []
        classifier = any("SequenceClassification" in a for a in archs) or "num_labels" in cfg
        return Architecture(
            name,
            BERT,
            cfg["num_hidden_layers"],
            cfg["hidden_size"],
            cfg["intermediate_size"],
            cfg["num_attention_heads"],
            cfg["num_attention_heads"],
            cfg["vocab_size"],
            False,
            max_positions=cfg.get("max_position_embeddings", 512),
            type_vocab=cfg.get("type_vocab_size", 2),
            num_labels=cfg.get("num_labels", 2) if classifier else 2,
            dropout=max(
                cfg.get("hidden_dropout_prob", 0.1), cfg.get("attention_probs_dropout_prob", 0.1)
            ),
            source="config.json",
            model_type=mtype,
        )
    if mtype in _LLAMA_TYPES:
        heads = cfg["num_attention_heads"]
        return Architecture(
            name,
            LLAMA,
            cfg["num_hidden_layers"],
            cfg["hidden_size"],
            cfg["intermediate_size"],
            heads,
            cfg.get("num_key_value_heads") or heads,
            cfg["vocab_size"],
            bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
            qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")),
            source="config.json",
            model_type=mtype,
        )
    raise ConfigError(
        f"model_type={mtype!r} is not modelled by the memory estimator; supported model types: "
        f"{sorted(_LLAMA_TYPES | _BERT_TYPES)} (or pass a preset: {', '.join(PRESETS)})"
    )


def from_model(model) -> Architecture:
    """Architecture of a loaded ``transformers`` model (reads ``model.config``)."""
    cfg = model.config.to_dict()
    if "SequenceClassification" in type(model).__name__:
        cfg["architectures"] = [type(model).__name__]
    return from_hf_config(cfg, name=type(model).__name__)


def resolve_architecture(model: str | Architecture) -> Architecture:
    """An :class:`Architecture` for a preset name, a bundled model name or a local HF directory.

    Raises:
        ConfigError: the name is none of these; the message lists the presets.
    """
    if isinstance(model, Architecture):
        return model
    key = str(model).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return from_hf_config(json.loads((path / "config.json").read_text()), name=path.name)
    from peftlab.models import BUNDLED, ModelLoadError, resolve

    if model in BUNDLED:
        try:
            directory, _ = resolve(model)
            return from_hf_config(json.loads((directory / "config.json").read_text()), name=model)
        except (ModelLoadError, OSError) as e:
            raise ConfigError(f"bundled model {model!r} could not be read: {e}") from None
    raise ConfigError(
        f"unknown model {model!r}: not a preset, a bundled model or a local Hugging Face "
        f"directory with a config.json. Known presets: {', '.join(PRESETS)}"
    )
