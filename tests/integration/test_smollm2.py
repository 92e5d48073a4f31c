"""LoRA and DoRA on the real bundled SmolLM2-135M-Instruct (GGUF → cached safetensors)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from peftlab.models import load_model, load_tokenizer

    return load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")


def _generate(model, tok, prompt="What is the capital of France?"):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_bundled_model_is_the_expected_architecture(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert "Paris" in _generate(model, tok)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_all_linear_apply_merge_generate(smollm2, method):
    base, tok = smollm2
    model = peftlab.apply(
        copy.deepcopy(base),
        peftlab.config_from_dict(
            {"method": method, "r": 8, "alpha": 16, "target_modules": "all-linear"}
        ),
    )
    trainable, total = peftlab.trainable_parameters(model)
    # Closed form: r·(in + out) per targeted layer (+ out for DoRA's magnitude), 7 per block.
    d, f, kv, layers = 576, 1536, 3 * 64, 30
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    expected = layers * sum(8 * (i + o) + (o if method == "dora" else 0) for i, o in shapes)
    assert trainable == expected
    print(
        f"\n{method} r=8 all-linear on SmolLM2-135M: {trainable:,} / {total:,} trainable "
        f"({100 * trainable / total:.3f}%)"
    )
    with torch.no_grad():  # a non-trivial update, so the merge has something to fold in
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-4)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        unmerged = model(ids).logits
    plain = peftlab.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, unmerged, rtol=0, atol=1e-4)
    answer = _generate(plain, tok)
    print(f"{method}: generate() after merge: {answer!r}")
    assert "Paris" in answer
