"""Prompt tuning (input-only soft prompt): equals the hand-built input, generates, classifies."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.state import adapter_configs
from tests.conftest import TINY, tiny_bert, tiny_llama


def _left_padded(batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_causal_lm_equals_prompt_prepended_by_hand():
    model = peftlab.apply(tiny_llama(), peftlab.PromptTuningConfig(num_virtual_tokens=3))
    prompt = model.peftlab_prompt.prompt_embeddings.default
    ids, mask = _left_padded()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        with peftlab.disable_adapters(model):
            embeds = model.get_input_embeddings()(ids)
            full = torch.cat([prompt.expand(3, -1, -1), embeds], 1)
            full_mask = torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], 1)
            by_hand = model(inputs_embeds=full, attention_mask=full_mask).logits[:, 3:]
    assert out.logits.shape == (3, 7, 128)  # prompt positions are not returned
    torch.testing.assert_close(out.logits, by_hand, rtol=0, atol=1e-6)
    assert torch.isfinite(out.loss)


def test_bert_classifies_from_cls_behind_the_prompt():
    model = peftlab.apply(tiny_bert(), peftlab.PromptTuningConfig(num_virtual_tokens=3))
    assert adapter_configs(model)["default"].modules_to_save == ("classifier",)
    prompt = model.peftlab_prompt.prompt_embeddings.default
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        with peftlab.disable_adapters(model):
            embeds = model.get_input_embeddings()(ids)
            hidden = model.bert(inputs_embeds=torch.cat([prompt.expand(2, -1, -1), embeds], 1))
            by_hand = model.classifier(model.bert.pooler(hidden.last_hidden_state[:, 3:]))
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_matches_loop_of_full_forwards(arch):
    model = peftlab.apply(TINY[arch](), peftlab.PromptTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        model.peftlab_prompt.prompt_embeddings.default.mul_(5)  # make the prompt matter
    model.generation_config.eos_token_id = None  # the loop below never stops at an EOS either
    ids, mask = _left_padded()
    new = 8
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
        seq, m = ids, mask
        for _ in range(new):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq[:, ids.shape[1] :])


def test_vocab_init_uses_embedding_rows():
    model = peftlab.apply(tiny_llama(), peftlab.PromptTuningConfig(num_virtual_tokens=5))
    prompt = model.peftlab_prompt.prompt_embeddings.default
    table = model.get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in prompt)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_config(bad):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        peftlab.PromptTuningConfig(num_virtual_tokens=bad)
    with pytest.raises(ConfigError, match="init"):
        peftlab.PromptTuningConfig(init="zeros")
