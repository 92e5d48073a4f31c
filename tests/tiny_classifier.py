"""A tiny BERT classifier with the character-level tokenizer, saved as a Hugging Face
directory, and small labelled CSV files, so ``peftlab compare`` runs classification end to end
in seconds."""

from __future__ import annotations

import random
from pathlib import Path

from tests.tiny_lm import char_tokenizer

WORDS = ["alpha", "bravo", "charlie", "delta", "echo"]


def save_tiny_bert(path: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer BERT encoder (vocab = the char tokenizer's) and its tokenizer to
    ``path``. Like the bundled MiniLM it has no classification head: loading it for
    classification adds a new one with as many labels as the data has."""
    import torch
    from transformers import BertConfig, BertModel

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    path = Path(path)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_classes(path: str | Path, classes: int, rows: int = 80, seed: int = 0) -> Path:
    """A CSV whose label is the class word the text starts with (learnable from characters)."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        k = i % classes
        lines.append(f"{WORDS[k]} {rng.choice(WORDS)} {i},{WORDS[k]}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
