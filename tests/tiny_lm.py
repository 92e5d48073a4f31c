"""A tiny causal LM with a character-level tokenizer, saved as a Hugging Face directory, so
training runs end to end (CLI, subprocesses, DDP) in seconds without the bundled model."""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable character and no chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        t: i for i, t in enumerate(SPECIALS + sorted(set(string.printable) - {"\x0b", "\x0c"}))
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny_lm(path: str | Path, seed: int = 0, hidden: int = 32) -> Path:
    """Write a 2-layer Llama (vocab = the char tokenizer's) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = Path(path)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_run_config(model: str, out: str | Path, **keys) -> dict:
    """A training config that runs in seconds on :func:`save_tiny_lm`'s model: LoRA r=4 on
    every linear layer, 6 steps of 4 built-in sort examples; ``keys`` override any key."""
    base = {
        "model": model,
        "method": "lora",
        "method_args": {"r": 4, "target_modules": "all-linear"},
        "data": "builtin:sort",
        "data_size": 64,
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "progress": False,
        "output_dir": str(out),
    }
    return {**base, **keys}
