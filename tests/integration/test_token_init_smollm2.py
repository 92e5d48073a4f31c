"""Virtual tokens initialized from the model start where the base model is: on SmolLM2-135M,
prompt tuning, Prefix-Tuning (reparameterized) and P-Tuning v2 with their default init begin
within 5% of the base model's loss (above it by at most 5%), where N(0, 1) tables wreck it."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    from peftlab.data import collate, load_task_data
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train.evaluate import loss_sum

    tok = load_tokenizer("smollm2-135m")
    tok.pad_token = tok.pad_token or tok.eos_token
    data = load_task_data(tok, "builtin:sort", "causal-lm", 128, 16, None, 64, 0, "text", "label")
    batch = collate(data.eval[:16], tok.pad_token_id)

    def loss(model):
        with torch.no_grad():
            s, n = loss_sum(model, batch)
        return (s / n).item()

    base = load_model("smollm2-135m").eval()
    return base, tok, loss, loss(base)


@pytest.mark.parametrize(
    "config",
    [
        peftlab.PromptTuningConfig(num_virtual_tokens=20),
        peftlab.PrefixTuningConfig(num_virtual_tokens=20),
        peftlab.PTuningV2Config(num_virtual_tokens=20),
        peftlab.PTuningV2Config(num_virtual_tokens=20, init="text", init_text="Sort the words."),
    ],
    ids=["prompt", "prefix-reparam", "ptuning-v2", "ptuning-v2-text"],
)
def test_model_based_init_starts_near_the_base_loss(setup, config):
    base, tok, loss, base_loss = setup
    model = copy.deepcopy(base)
    peftlab.apply(model, config.with_tokenizer(tok))
    assert loss(model) <= 1.05 * base_loss


def test_random_init_is_far_from_the_base_loss(setup):
    base, _, loss, base_loss = setup
    model = copy.deepcopy(base)
    peftlab.apply(model, peftlab.PTuningV2Config(num_virtual_tokens=20, init="random"))
    assert loss(model) > 2 * base_loss  # why the default is not N(0, 1)
