"""The contract every registered method keeps, checked on tiny Llama, GPT-2 and BERT models."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.core.model import adapter_layers
from peftlab.core.registry import get_method
from tests.conftest import TINY

# Small settings per method for tiny models (defaults otherwise).
TINY_ARGS: dict[str, dict] = {
    "lora": {"r": 4, "target_modules": "all-linear"},
    "dora": {"r": 4, "target_modules": "all-linear"},
    "qlora": {"r": 4, "target_modules": "all-linear"},
    "adapter": {"bottleneck": 8, "placement": "houlsby"},
    # Virtual-token methods train a classifier's head by default (modules_to_save); [] keeps
    # it frozen here because unload cannot restore a head trained in place.
    "prefix": {"num_virtual_tokens": 4, "reparam_hidden": 16, "modules_to_save": []},
    "ptuning-v2": {"num_virtual_tokens": 4, "modules_to_save": []},
    "prompt": {"num_virtual_tokens": 4, "modules_to_save": []},
}
# (method, arch) pairs a method does not support, with the reason.
UNSUPPORTED: dict[tuple[str, str], str] = {}

CASES = [(m, a) for m in peftlab.methods() for a in sorted(TINY) if (m, a) not in UNSUPPORTED]


def _config(method: str):
    return peftlab.config_from_dict({"method": method, **TINY_ARGS.get(method, {})})


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def _loss(model, batch):
    if type(model).__name__.endswith("ForSequenceClassification"):
        return model(input_ids=batch, labels=torch.tensor([0, 1])).loss
    return model(input_ids=batch, labels=batch).loss


def _perturb(model, seed=3):
    """Give every adapter parameter a non-trivial value (zero-init parts included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method,arch", CASES)
def test_contract(method, arch, batch, tmp_path):
    base = TINY[arch]()
    ref = _logits(base, batch)
    model = copy.deepcopy(base)
    config = _config(method)
    peftlab.apply(model, config)
    spec = get_method(method)

    if config.preserves_output_at_init:
        torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-6)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    if spec.param_prefix:
        assert all(spec.param_prefix in n for n in trainable), trainable
        t, total = peftlab.trainable_parameters(model)
        assert 0 < t < total

    # A few optimizer steps lower the loss on a fixed batch.
    # The baseline is an eval-mode loss like the final one: train-mode dropout noise can
    # exceed what 5 steps change (frozen random classifier head on tiny BERT).
    with torch.no_grad():
        first = _loss(model, batch).item()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert _loss(model, batch).item() < first
    _perturb(model)
    out = _logits(model, batch)

    # save → load reproduces the logits exactly.
    peftlab.save_adapter(model, tmp_path / "a")
    loaded = peftlab.load_adapter(TINY[arch](), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, batch), out, rtol=0, atol=0)

    if config.mergeable:
        peftlab.merge(model)
        torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-5)
        peftlab.unmerge(model)
        torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=1e-5)
        plain = peftlab.merge_and_unload(model)
        torch.testing.assert_close(_logits(plain, batch), out, rtol=0, atol=1e-5)
    else:
        plain = peftlab.unload(model)
        torch.testing.assert_close(_logits(plain, batch), ref, rtol=0, atol=1e-6)
    assert not list(adapter_layers(plain))
    assert not any(type(m).__module__.startswith("peftlab") for m in plain.modules())
    assert not hasattr(plain, "peftlab_config")
