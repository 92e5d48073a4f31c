"""The benchmarks' model: SmolLM2-135M (or a tiny random Llama for smoke tests), dense or NF4.

The quantized base is what QLoRA trains on, the same for peftlab and peft: bitsandbytes NF4
with double quantization, loaded through ``from_pretrained(quantization_config=...)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

TINY = "tiny"
_tiny_dir: Path | None = None


def _dtype(args) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]


def tiny_llama_dir() -> Path:
    """A tiny random Llama (GQA, 2 layers) saved once per process, so it loads like a real one."""
    global _tiny_dir
    if _tiny_dir is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        _tiny_dir = Path(tempfile.mkdtemp(prefix="peftlab-bench-tiny-"))
        LlamaForCausalLM(cfg).save_pretrained(_tiny_dir)
    return _tiny_dir


def load(args, quantized: bool = False) -> nn.Module:
    """The model named by ``args.model`` in ``args.dtype`` on ``args.device`` (NF4 if ``quantized``)."""
    from peftlab.models import load_model

    name = str(tiny_llama_dir()) if args.model == TINY else args.model
    dtype = _dtype(args)
    if not quantized:
        return load_model(name, kind="causal-lm", dtype=dtype).to(args.device)
    from transformers import BitsAndBytesConfig

    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return load_model(
        name, kind="causal-lm", dtype=dtype, quantization_config=qconfig, device_map=args.device
    )


def quantized_storage(model: nn.Module) -> dict:
    """Bytes the 4-bit base weights really take, per parameter; {} if nothing is quantized.

    Counts the packed codes, the (double-quantized) absmax, its fp32 second-level absmax and
    offset. The 16-entry NF4 code book and the 256-entry second-level table are shared by
    all layers and left out (their few KB are noise next to 100M weights).
    """
    params = nbytes = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is None:
            continue
        params += qs.shape.numel()
        nbytes += w.numel() * w.element_size()
        nbytes += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None:
            nbytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            nbytes += 4  # offset, one fp32
    if not params:
        return {}
    return {"quant_params": params, "quant_bits_per_param": 8 * nbytes / params}
