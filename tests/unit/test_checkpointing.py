"""peftlab's per-layer activation checkpointing: config forms, exactness (LoRA with dropout,
prefix and prompt tuning; every layer, every 2nd), recomputation, memory saved, offload."""

from __future__ import annotations

import contextlib

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.train import TrainConfig, checkpointing
from peftlab.train.checkpointing import CheckpointPlan
from tests.conftest import tiny_gpt2


def tiny_llama4(seed: int = 0):
    """A 4-layer tiny Llama, so that "every 2nd layer" leaves layers out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


CONFIGS = {
    "lora": {"method": "lora", "r": 4, "target_modules": "all-linear", "dropout": 0.2},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3, "reparam_hidden": 16},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
}


def _model(method: str, spec, make=tiny_llama4):
    model = make().train()
    peftlab.apply(model, peftlab.config_from_dict(CONFIGS[method]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial adapters (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    checkpointing.enable(model, spec)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model):
    torch.manual_seed(11)  # LoRA dropout: the recompute must draw the same masks
    loss = model(**_batch()).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def test_config_forms():
    assert CheckpointPlan.from_spec(False) is None and CheckpointPlan.from_spec(None) is None
    assert CheckpointPlan.from_spec(True).indices(4) == [0, 1, 2, 3]
    assert CheckpointPlan.from_spec({"every": 2}).indices(5) == [0, 2, 4]
    assert CheckpointPlan.from_spec([3, 1]).indices(4) == [1, 3]
    plan = CheckpointPlan.from_spec({"layers": [0], "offload": True})
    assert plan.offload and plan.indices(2) == [0]
    bad = [
        ({"every": 0}, "every is a positive integer"),
        ({"every": 2, "layers": [1]}, "every or layers, not both"),
        ({"evry": 2}, r"unknown key\(s\) \['evry'\]"),
        ([0, -1], "non-negative layer indices"),
        ({"offload": "yes"}, "offload is true or false"),
        ("all", "false, true"),
    ]
    for spec, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            CheckpointPlan.from_spec(spec)
    with pytest.raises(ConfigError, match=r"layer indices below 4 \(got \[7\]\)"):
        checkpointing.enable(tiny_llama4(), [0, 7])
    with pytest.raises(ConfigError, match="gradient_checkpointing="):
        TrainConfig(gradient_checkpointing={"every": -1})


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("spec", [True, {"every": 2}, [3]], ids=["every", "every-2nd", "last"])
def test_exact_with_checkpointing(method, spec):
    loss0, grads0 = _loss_and_grads(_model(method, False))
    model = _model(method, spec)
    assert checkpointing.enabled_layers(model) == CheckpointPlan.from_spec(spec).indices(4)
    loss1, grads1 = _loss_and_grads(model)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6 * g0.abs().max().item())


def test_gpt2_positional_cache_is_withheld():
    """GPT2Block takes its cache positionally; a checkpointed block must not write it."""
    loss0, grads0 = _loss_and_grads(_model("lora", False, tiny_gpt2))
    loss1, grads1 = _loss_and_grads(_model("lora", True, tiny_gpt2))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6 * g0.abs().max().item())


def test_checkpointed_layers_are_recomputed_and_save_less():
    model = _model("lora", {"every": 2})
    calls = [0] * 4
    for i, layer in enumerate(checkpointing.decoder_layers(model)):
        # a pre-hook: the recompute stops inside the MLP once it has what backward needs
        layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    _loss_and_grads(model)
    assert calls == [2, 1, 2, 1]  # layers 0 and 2 ran again in backward

    def saved_bytes(m):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(**_batch())
        return total[0]

    plain, every2, every = (saved_bytes(_model("lora", s)) for s in (False, {"every": 2}, True))
    assert every < every2 < plain
    with torch.no_grad():  # no backward to replay: layers run as they are
        calls[:] = [0] * 4
        model(**_batch())
        assert calls == [1, 1, 1, 1]
    checkpointing.disable(model)
    assert checkpointing.enabled_layers(model) == []


def test_offload_is_a_no_op_on_cpu_and_exact_when_forced(monkeypatch):
    loss0, grads0 = _loss_and_grads(_model("lora", False))
    entered = []
    real = checkpointing.offload_context

    def spy(offload, device):
        ctx = real(offload, device)
        entered.append(type(ctx).__name__)
        return ctx

    monkeypatch.setattr(checkpointing, "offload_context", spy)
    loss1, grads1 = _loss_and_grads(_model("lora", {"offload": True}))
    assert set(entered) == {"nullcontext"}  # CPU: the inputs already live on the CPU
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)

    # What a GPU run does, on the CPU: the checkpointed inputs are packed (copied) by
    # save_on_cpu and unpacked for the recompute; the results must not change.
    packed = []

    class Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self):
            super().__init__(pin_memory=False)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(t.shape), pack(t))[1]

    def forced(offload, device):
        return Counting() if offload else contextlib.nullcontext()

    monkeypatch.setattr(checkpointing, "offload_context", forced)
    loss2, grads2 = _loss_and_grads(_model("lora", {"offload": True}))
    assert torch.Size([3, 16, 32]) in packed  # a layer's input hidden states went through
    torch.testing.assert_close(loss2, loss0, rtol=1e-6, atol=0)
    for g2, g0 in zip(grads2, grads0):
        torch.testing.assert_close(g2, g0, rtol=1e-5, atol=1e-6 * g0.abs().max().item())


def test_trainer_checkpoints_the_chosen_layers(tmp_path):
    from peftlab.models import load_model
    from peftlab.train import train
    from tests.tiny_lm import save_tiny_lm

    tiny = str(save_tiny_lm(tmp_path / "lm"))
    model = load_model(tiny)
    base = dict(
        model=tiny,
        method="prompt",
        method_args={"num_virtual_tokens": 3},
        data="builtin:sort",
        data_size=32,
        eval_size=0,
        max_steps=2,
        batch_size=4,
        lr=1e-2,
        progress=False,
    )
    summary = train(
        {**base, "gradient_checkpointing": [1], "output_dir": str(tmp_path / "a")}, model=model
    )
    assert checkpointing.enabled_layers(model) == [1]
    plain = train({**base, "output_dir": str(tmp_path / "b")})
    assert summary["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
