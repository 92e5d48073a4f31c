"""Bottleneck adapters on the real bundled SmolLM2-135M-Instruct: placement, size, identity."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from peftlab.models import load_model

    return load_model("smollm2-135m").eval()


@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_reduction_16_size_and_identity_at_init(smollm2, placement, per_block):
    model = peftlab.apply(
        copy.deepcopy(smollm2), peftlab.AdapterConfig(reduction_factor=16, placement=placement)
    )
    trainable, total = peftlab.trainable_parameters(model)
    d, layers = 576, 30
    m = d // 16  # 36
    assert trainable == layers * per_block * (2 * d * m + d + m)
    assert total == sum(p.numel() for p in smollm2.parameters()) + trainable
    print(
        f"\nadapter {placement} reduction_factor=16 (m={m}) on SmolLM2-135M: "
        f"{trainable:,} / {total:,} trainable ({100 * trainable / total:.3f}%)"
    )
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, smollm2(ids).logits, rtol=0, atol=0)
