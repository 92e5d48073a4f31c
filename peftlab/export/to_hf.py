"""Merged model → a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

safetensors weights (sharded above ``max_shard_size``, with ``model.safetensors.index.json``),
``config.json`` (its ``dtype`` the export's), ``generation_config.json``, the tokenizer files
and the chat template, as ``save_pretrained`` writes them. A base read from a GGUF file
carries transformers' ``quantization_config`` for GGUF; it is dropped, since the weights
written are plain floats (transformers refuses to save the model otherwise).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def write_hf(model: nn.Module, tokenizer, out: Path, dtype: str, max_shard_size: str) -> dict:
    """Save the merged ``model`` in ``dtype`` and ``tokenizer`` to ``out``; returns a summary."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(DTYPES[dtype])
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    return {
        "files": files,
        "shards": sum(f.endswith(".safetensors") for f in files),
        "dtype": str(DTYPES[dtype]).removeprefix("torch."),
    }


def load_hf(out: Path, dtype: str):
    """The export loaded the way a user loads it: ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype]).eval()
    return model, AutoTokenizer.from_pretrained(out)
