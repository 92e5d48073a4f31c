"""Merged model → one GGUF file for llama.cpp / Ollama (Llama, Mistral, Qwen2 and Qwen3).

The file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for these classes (Mistral is
written as llama.cpp's converter writes it: the ``llama`` architecture):

- tensor names from gguf-py's own map for the architecture
  (``model.layers.N.self_attn.q_proj.weight`` → ``blk.N.attn_q.weight``,
  ``model.embed_tokens`` → ``token_embd``, ``lm_head`` → ``output``, omitted when tied to the
  embeddings; Qwen's q/k/v biases and Qwen3's q/k norms under their own names);
- for the ``llama`` architecture only, Q and K rows permuted for llama.cpp's rotary layout
  (pairs (i, i + d/2) become adjacent):
  ``W.reshape(h, 2, d/2, n).swapaxes(1, 2).reshape(W.shape)`` with ``h`` = heads for Q and
  key/value heads for K; transformers' GGUF loader applies the inverse on load. Qwen's
  architectures use the rotary layout transformers uses (NeoX), unpermuted;
- 1-D tensors (norms, biases) in F32; 2-D ones in the requested type. Q8_0 blocks hold 32
  values with one scale (8.5 bits per weight); a row whose length is not a multiple of 32
  falls back to F16, as llama.cpp's converter does;
- ``<arch>.*`` hyperparameters under llama.cpp's key names, ``general.file_type`` and
  ``general.quantization_version``, and the tokenizer (:mod:`peftlab.export.gguf_vocab`).

Other architectures are refused, as are variants llama.cpp would run differently from
transformers with only these keys (RoPE scaling, MLP biases, an activation other than SiLU,
Qwen's sliding-window attention). A Mistral sliding window is not stored (llama.cpp's converter
drops it too): the export says so in its warnings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from peftlab.export import gguf_vocab
from peftlab.export.errors import ExportError

QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
SUPPORTED = (
    "Llama (Llama 1-3 without RoPE scaling, SmolLM/SmolLM2, TinyLlama), Mistral, Qwen2 and Qwen3"
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one transformers ``model_type`` is written."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    """llama.cpp's Llama architecture keeps rotary pairs adjacent (Q/K rows permuted)."""

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


LAYOUTS = {
    "llama": Layout(gguf.MODEL_ARCH.LLAMA, True),
    "mistral": Layout(gguf.MODEL_ARCH.LLAMA, True),  # as llama.cpp's converter writes it
    "qwen2": Layout(gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": Layout(gguf.MODEL_ARCH.QWEN3, False),
}


def check_architecture(config) -> list[str]:
    """Refuse a model these GGUF layouts cannot describe exactly; returns warnings for what
    the file leaves out that llama.cpp's converter leaves out as well."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise ExportError(
            f"--format gguf supports the {SUPPORTED} families; this model is model_type "
            f"{model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}); "
            f"export --format hf instead"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling rope_type={rope_type!r}")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    if model_type.startswith("qwen") and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if problems:
        raise ExportError(
            f"--format gguf writes plain {model_type} models; this one has "
            f"{', '.join(problems)}, which the GGUF writer does not describe (export --format hf "
            f"instead)"
        )
    window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
    if window:
        return [
            f"sliding_window={window} is not stored in the GGUF (llama.cpp's converter drops "
            f"it as well): llama.cpp attends over the whole context, which equals transformers' "
            f"output for sequences of up to {window} tokens"
        ]
    return []


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` for a Q (``n_head`` heads) or K (key/value heads)
    weight ``[n_head·d, in]`` or bias ``[n_head·d]``."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hyperparameters(writer: gguf.GGUFWriter, config, file_type: int) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def _general(writer: gguf.GGUFWriter, name: str, source: Path | None) -> None:
    """``general.*``: a name saying what this is, and the source GGUF's provenance fields."""
    writer.add_type("model")
    writer.add_name(name)
    if source is None:
        return
    reader = gguf.GGUFReader(source)
    for key in ("organization", "basename", "size_label", "license", "languages"):
        field = reader.fields.get(f"general.{key}")
        if field is None:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(
                field.name, list(field.contents()), field.types[0], sub_type=field.types[-1]
            )
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])


def tensors(model: nn.Module, quant: str) -> list[tuple[str, np.ndarray, object]]:
    """``(gguf name, data, ggml type)`` for every weight of the merged model (quantized data
    as the ``uint8`` blocks gguf-py's writer takes)."""
    config = model.config
    qtype = QUANTS[quant][0]
    layout = LAYOUTS[config.model_type]
    names = gguf.get_tensor_name_map(layout.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name in the {layout.name} layout")
        t = t.detach().float()
        if layout.permute_qk and ".self_attn.q_proj." in hf_name:
            t = permute_qk(t, heads)
        elif layout.permute_qk and ".self_attn.k_proj." in hf_name:
            t = permute_qk(t, kv_heads)
        data = t.contiguous().numpy()
        ttype = qtype if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        try:
            q = gguf.quants.quantize(data, ttype)
        except gguf.QuantError:  # rows not a multiple of the block size
            ttype = gguf.GGMLQuantizationType.F16
            q = gguf.quants.quantize(data, ttype)
        out.append((name, q, ttype))
    return out


def write_gguf(model: nn.Module, tokenizer, base: str, path: Path, quant: str, name: str) -> dict:
    """Write the merged ``model`` with its tokenizer to ``path``; returns a summary (its
    ``warnings``: what the file leaves out, see :func:`check_architecture`)."""
    from peftlab.export.source import source_gguf
    from peftlab.models import resolve

    warnings = check_architecture(model.config)
    qtype, file_type = QUANTS[quant]
    src_gguf = source_gguf(base)
    writer = gguf.GGUFWriter(path, LAYOUTS[model.config.model_type].name)
    _general(writer, name, src_gguf)
    _hyperparameters(writer, model.config, file_type)
    if src_gguf is not None:
        gguf_vocab.copy_from_gguf(writer, src_gguf)
        vocab = {"copied_from": str(src_gguf)}
    else:
        directory, _ = resolve(base)
        vocab = gguf_vocab.build_from_hf(writer, tokenizer, directory, model.config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for tname, data, ttype in tensors(model, quant):
        writer.add_tensor(tname, data, raw_dtype=ttype)
        counts[ttype.name] = counts.get(ttype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "tensor_types": counts, "tokenizer": vocab, "warnings": warnings}


def load_gguf(path: Path):
    """The export loaded the way a user loads it in transformers: ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. a hyperparameter it does not map
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"transformers' GGUF loader could not load the export to verify it ({first}); "
            f"nothing was written. --no-verify writes it unchecked"
        ) from None
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, **kwargs)


def loader_splits_like(path: Path) -> bool:
    """Whether transformers' GGUF loader rebuilds this file's pre-tokenizer (it knows a
    handful of ``tokenizer.ggml.pre`` names and falls back to GPT-2's split for the rest;
    llama.cpp knows them all)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else "default"
    return pre in GGUF_PRE_TOKENIZER_SPLITS or pre in ("default", "gpt-2", "gpt2")
