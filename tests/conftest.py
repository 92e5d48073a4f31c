"""Shared fixtures: tiny randomly initialised models of the three architecture families."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _tiny(config_class: str, model_class: str, seed: int, **fields):
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(vocab_size=128, **fields)
    return getattr(transformers, model_class)(config).eval()


_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MORE = {
    # OPT's heads call model.decoder directly, past OPTModel (virtual tokens must hook it).
    "opt": lambda seed=0: _tiny("OPTConfig", "OPTForCausalLM", seed, **_SIZES, ffn_dim=64,
                                word_embed_proj_dim=32, max_position_embeddings=128),
    # Multi-query attention: one key/value head whatever num_kv_heads says.
    "falcon": lambda seed=0: _tiny("FalconConfig", "FalconForCausalLM", seed, **_SIZES),
    # A norm named "post_attention_layernorm" comes before the "attention" module; fused qkv.
    "gpt_neox": lambda seed=0: _tiny("GPTNeoXConfig", "GPTNeoXForCausalLM", seed, **_SIZES,
                                     intermediate_size=64, max_position_embeddings=128),
    # Fused qkv_proj and gate_up_proj.
    "phi3": lambda seed=0: _tiny("Phi3Config", "Phi3ForCausalLM", seed, **_SIZES,
                                 intermediate_size=64, num_key_value_heads=2, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, max_position_embeddings=128),
    # An encoder whose attention child is preceded by "attn_norm"; no key/value cache.
    "modernbert": lambda seed=0: _tiny("ModernBertConfig", "ModernBertForSequenceClassification",
                                       seed, **_SIZES, intermediate_size=64, num_labels=2,
                                       max_position_embeddings=128, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                       sep_token_id=2),
}  # fmt: skip
"""More architecture families, for the contract's second sweep (tests/contract)."""


@pytest.fixture(params=sorted(TINY))
def tiny_arch(request):
    """Name of each tiny architecture in turn."""
    return request.param


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 9))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a character tokenizer saved as a HF directory (read-only: share it)."""
    from tests.tiny_lm import save_tiny_lm

    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm"))
