"""The memory estimator on Llama-family model types beyond Llama itself: Gemma 1 (GeGLU, a
scaled embedding, a tied head) and Granite (constant multipliers) save what a Llama block
saves; Gemma 2 (two more norms per block, soft-capped attention) does not and is refused."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.select.estimator import estimate_memory
from peftlab.select.models import plan
from peftlab.select.presets import from_model
from tests.conftest import _tiny
from tests.estimator_support import _config
from tests.unit.test_estimator import _saved_bytes

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
FAMILIES = {
    "gemma": lambda: _tiny("GemmaConfig", "GemmaForCausalLM", 0, **SIZES, head_dim=8),
    "granite": lambda: _tiny("GraniteConfig", "GraniteForCausalLM", 0, **SIZES),
}
METHODS = ["full", "lora", "dora", "ia3", "prompt", "prefix", "adapter", "vera"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_saved_activations_and_trainable_count_match(method, family, attention):
    model = FAMILIES[family]()
    model.config._attn_implementation = attention
    cfg = _config(method)
    arch = from_model(model)
    est = estimate_memory(arch, cfg, 3, 16, "float32", attention=attention, device="cpu",
                          chunked_loss=False)  # fmt: skip
    trainable = plan(arch, cfg).trainable
    peftlab.apply(model, cfg)
    assert trainable == peftlab.trainable_parameters(model)[0]
    model.train()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids, ids)
    assert est.detail["saved_activations"] == pytest.approx(measured, rel=0.05)


def test_gemma2_is_refused_by_name():
    model = _tiny("Gemma2Config", "Gemma2ForCausalLM", 0, **SIZES, head_dim=8)
    with pytest.raises(ConfigError, match="model_type='gemma2' is not modelled"):
        from_model(model)
