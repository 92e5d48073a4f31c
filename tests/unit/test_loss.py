"""Chunked cross-entropy: the same loss and gradients as the plain loss (every method, tied
heads, logit transforms, DDP, the trainer), refusals, and O(chunk · V) logits memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.train.evaluate import loss_sum
from peftlab.train.loss import ChunkedLossUnsupported, chunked_loss_sum
from tests.conftest import MORE, tiny_gpt2, tiny_llama

ARGS: dict[str, dict] = {
    "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.1},
    "dora": {"r": 4, "target_modules": "all-linear"},
    "qlora": {"r": 4, "target_modules": "all-linear"},
    "adapter": {"bottleneck": 8},
    "prefix": {"num_virtual_tokens": 3, "reparam_hidden": 16},
    "ptuning-v2": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
}


def _batch(seed=1, vocab=128, b=3, t=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # response-only: the prompt carries no loss
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # a padded row
    labels[2, 14:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _loss_and_grads(model, batch, chunked, seed=7):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the same dropout masks on both sides
    if chunked == "direct":  # no fallback to the plain loss
        total, count = chunked_loss_sum(model, **batch)
    else:
        total, count = loss_sum(model, batch, chunked)
    return total, count, torch.autograd.grad(total, params)


def _assert_same(model, batch, rtol=1e-5, chunked="direct"):
    total_c, count_c, grads_c = _loss_and_grads(model, batch, chunked)
    total_p, count_p, grads_p = _loss_and_grads(model, batch, False)
    assert int(count_c) == int(count_p) > 0
    torch.testing.assert_close(total_c, total_p, rtol=rtol, atol=0)
    for gc, gp in zip(grads_c, grads_p):
        torch.testing.assert_close(gc, gp, rtol=rtol, atol=rtol * gp.abs().max().item())


@pytest.mark.parametrize("method", peftlab.methods())
def test_every_method_matches_the_plain_loss(method):
    model = tiny_llama().train()
    peftlab.apply(model, peftlab.config_from_dict({"method": method, **ARGS.get(method, {})}))
    _perturb(model)
    _assert_same(model, _batch())


@pytest.mark.parametrize("arch", sorted(a for a in MORE if a != "modernbert"))
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_other_causal_families_match_the_plain_loss(arch, method):
    """OPT's head calls model.decoder past OPTModel: the loss hooks the module that runs the
    layers (it fell back to the plain loss before); Falcon, GPT-NeoX and Phi-3 as well."""
    model = MORE[arch]().train()
    peftlab.apply(model, peftlab.config_from_dict({"method": method, **ARGS[method]}))
    _perturb(model)
    _assert_same(model, _batch())


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_tied_head_trains_the_same(chunk):
    """GPT-2 ties its head to the input embedding; under full fine-tuning both uses of the one
    matrix must receive the plain loss's gradient (the head's part comes from the chunks)."""
    model = tiny_gpt2().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    peftlab.apply(model, peftlab.config_from_dict({"method": "full"}))
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    plain = F.cross_entropy(ref.logits.flatten(0, 1), shifted.flatten(), reduction="sum")
    grads_p = torch.autograd.grad(plain, params)
    torch.manual_seed(7)
    total, _ = chunked_loss_sum(model, **batch, chunk_size=chunk)
    grads_c = torch.autograd.grad(total, params)
    torch.testing.assert_close(total, plain, rtol=1e-5, atol=0)
    for gc, gp in zip(grads_c, grads_p):
        torch.testing.assert_close(gc, gp, rtol=1e-5, atol=1e-5 * gp.abs().max().item())


def test_public_function_is_the_transformers_mean_loss():
    model = tiny_llama().train()
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules="all-linear"))
    _perturb(model)
    batch = _batch()
    ref = model(**batch).loss
    got = peftlab.chunked_lm_loss(model, **batch, chunk_size=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    with torch.no_grad():  # evaluation: no gradients computed, same value
        torch.testing.assert_close(peftlab.chunked_lm_loss(model, **batch), ref.detach())
    no_labels = torch.full_like(batch["labels"], -100)
    assert math.isnan(peftlab.chunked_lm_loss(model, batch["input_ids"], no_labels).item())


def _gemma2(**extra):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **extra,
    )
    return Gemma2ForCausalLM(cfg)


def _granite(**extra):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    cfg = GraniteConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    return GraniteForCausalLM(cfg)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _gemma2(final_logit_softcapping=0.5),  # a cap that bends the logits hard
        lambda: _granite(logits_scaling=0.25),
    ],
    ids=["softcap", "logits_scaling"],
)
def test_logit_transforms_of_the_config_are_applied(make):
    model = make().train()
    peftlab.apply(model, peftlab.config_from_dict({"method": "full"}))  # the head trains too
    _assert_same(model, _batch(), rtol=1e-4)


def test_unknown_logit_transform_is_refused_and_the_trainer_falls_back():
    class Doubled(type(tiny_llama())):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            out = super().forward(
                input_ids, attention_mask, logits_to_keep=logits_to_keep, **kwargs
            )
            out.logits = out.logits * 2
            return out

    model = Doubled(tiny_llama().config).train()
    batch = _batch()
    with pytest.raises(ChunkedLossUnsupported, match="logits are not its head applied"):
        chunked_loss_sum(model, **batch)
    with pytest.warns(UserWarning, match="using the plain loss"):
        total, _ = loss_sum(model, batch, chunked=True)
    torch.testing.assert_close(total, loss_sum(model, batch, chunked=False)[0])


def test_an_adapted_head_is_refused_and_the_trainer_falls_back():
    model = tiny_llama().train()
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["lm_head", "q_proj"]))
    _perturb(model)
    with pytest.raises(ChunkedLossUnsupported, match="not a plain nn.Linear"):
        chunked_loss_sum(model, **_batch())
    with pytest.warns(UserWarning, match="plain loss"):
        _assert_same(model, _batch(), chunked=True)


def test_a_hooked_head_is_refused():
    """A forward hook on the head (accelerate's offloading, a user's probe) would be bypassed
    by reading the weight directly."""
    model = tiny_llama().train()
    chunked_loss_sum(model, **_batch())
    model.lm_head.register_forward_hook(lambda m, a, out: out * 2)
    with pytest.raises(ChunkedLossUnsupported, match="has forward hooks"):
        chunked_loss_sum(model, **_batch())


class _Largest(TorchDispatchMode):
    """Records the element count of the largest new tensor (not a view) any operation makes."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def test_no_tensor_larger_than_a_chunk_of_logits_ever_exists():
    """Forward and backward of the chunked loss never create a tensor of the full [N, V]
    logits: the largest one is a chunk's [c, V]; the plain loss creates [B·T, V]."""
    model = tiny_llama().train()
    model.resize_token_embeddings(4096)  # vocabulary ≫ hidden, as in real models
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules="all-linear"))
    batch = _batch(vocab=4096, b=4, t=64)
    vocab, chunk = 4096, 16
    with _Largest() as plain:
        loss_sum(model, batch, chunked=False)[0].backward()
    with _Largest() as chunked:
        chunked_loss_sum(model, **batch, chunk_size=chunk)[0].backward()
    assert plain.numel >= 4 * 64 * vocab
    assert chunked.numel <= chunk * vocab, chunked.op


def test_through_a_ddp_wrapper(tmp_path):
    """Under DistributedDataParallel the model is called through the wrapper (so gradients are
    synced); one process, gloo."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = tiny_llama().train()
        peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules="all-linear"))
        _perturb(model)
        batch = _batch()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_sum(model, batch, chunked=False)[0].backward()
        ref = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        ddp = DistributedDataParallel(model)
        calls = []
        ddp.register_forward_pre_hook(lambda *a: calls.append(1))
        total, _ = loss_sum(ddp, batch, chunked=True)
        total.backward()
        assert calls  # the wrapper's forward ran
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
        # The wrapper (its reducer holds the process group) goes before the group does: its
        # destructor running after destroy_process_group once hung joining gloo's threads.
        del ddp, total
        import gc

        gc.collect()
    finally:
        dist.destroy_process_group()


def test_trainer_losses_equal_with_and_without_chunking(tmp_path):
    from peftlab.train import TrainConfig, train
    from tests.tiny_lm import save_tiny_lm

    tiny = str(save_tiny_lm(tmp_path / "lm"))
    runs = {}
    for chunked in (True, False):
        cfg = dict(
            model=tiny,
            method="lora",
            method_args={"r": 4, "target_modules": "all-linear"},
            data="builtin:sort",
            data_size=32,
            eval_size=4,
            max_steps=3,
            batch_size=4,
            lr=1e-2,
            eval_exact_match=False,
            progress=False,
            chunked_loss=chunked,
            output_dir=str(tmp_path / str(chunked)),
        )
        runs[chunked] = train(cfg)
    assert runs[True]["final_loss"] == pytest.approx(runs[False]["final_loss"], rel=1e-5)
    for key in ("eval_before", "eval_after"):
        assert runs[True][key]["eval_loss"] == pytest.approx(
            runs[False][key]["eval_loss"], rel=1e-5
        )
    with pytest.raises(peftlab.ConfigError, match="chunked_loss='yes' is invalid"):
        TrainConfig(chunked_loss="yes")


def test_loss_memory_benchmark_worker_runs():
    from benchmarks import loss_memory

    tiny = ["--model", "tiny", "--batch", "2", "--seq", "16", "--warmup", "0", "--steps", "1"]
    runs = {
        c: loss_memory.worker(loss_memory.parse_args(["--config", c, *tiny]))
        for c in ("plain", "chunked+ckpt", "peft+ckpt")
    }
    # peft's LoRA (B = 0) and transformers' own loss start from the same loss as ours
    for c in ("chunked+ckpt", "peft+ckpt"):
        assert runs[c]["first_loss"] == pytest.approx(runs["plain"]["first_loss"], rel=1e-5)
    assert all(r["step_s"] > 0 and r["peak_gb"] > 0 for r in runs.values())
    # the estimator's prediction beside peftlab's runs (not peft's), and its error printed
    assert runs["plain"]["estimated_gb"] > runs["chunked+ckpt"]["estimated_gb"] > 0
    assert runs["peft+ckpt"]["estimated_gb"] is None
    assert 0 < runs["plain"]["model_gb"] <= runs["plain"]["peak_gb"]
    lines: list[str] = []
    loss_memory.report({c: {**r, "n": 1} for c, r in runs.items()}, out=lines.append)
    text = "\n".join(lines)
    assert "est. err" in text and "%" in text
    assert "chunked+ckpt" in text and "vs peft+ckpt" in text
