"""LoRA on embedding tables: parity with peft, files both ways, exact merges (tied heads too),
and every place a LoRA layer goes — mixed batches, combining, hot swaps, LoRA+, QLoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.methods._lora_embedding import LoRAEmbedding
from tests.conftest import TINY

peft = pytest.importorskip("peft")

EMBED = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
LINEAR = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}


def _lora(arch, **kw):
    kw = {"r": 4, "alpha": 8, **kw}
    return peftlab.LoRAConfig(target_modules=[EMBED[arch], LINEAR[arch]], **kw)


def _perturb(model, seed=0):
    """Random values in every LoRA factor (A starts at zero on an embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model, ids):
    out = model(input_ids=ids)
    return out.logits.detach()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_outputs_and_factor_grads_match_peft(arch, batch):
    base = TINY[arch]()
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=[EMBED[arch], LINEAR[arch]]),
    )
    ours = peftlab.apply(copy.deepcopy(base), _lora(arch))
    assert isinstance(ours.get_input_embeddings(), LoRAEmbedding)
    assert torch.equal(_logits(ours, batch), _logits(base, batch))  # unchanged at init
    _perturb(pm)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                key = n.removeprefix("base_model.model.")
                key = key if key in mine else key + ".weight"  # peft's bare embedding factors
                mine[key].copy_(p)
    grads = []
    for model in (pm, ours):
        out = model(input_ids=batch).logits
        out.pow(2).mean().backward()
        grads.append(
            {
                n.removeprefix("base_model.model.").removesuffix(".weight"): p.grad
                for n, p in model.named_parameters()
                if "lora_embedding" in n
            }  # fmt: skip
        )
        grads.append(out.detach())
    torch.testing.assert_close(grads[3], grads[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[2].keys() and len(grads[0]) == 2
    for k in grads[0]:
        torch.testing.assert_close(grads[2][k], grads[0][k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_load_both_ways_with_peft(arch, batch, tmp_path):
    base = TINY[arch]()
    ours = peftlab.apply(copy.deepcopy(base), _lora(arch))
    _perturb(ours)
    want = _logits(ours, batch)
    peftlab.save_adapter(ours, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(pm, batch), want, atol=1e-5, rtol=1e-5)
    # peft writes the embedding's base weights beside the factors when it knows the name
    # (save_embedding_layers, "embed_tokens"): equal to the model's, they change nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(".base_layer." in k for k in keys) == (arch == "llama")
    back = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(back, batch), want, atol=1e-5, rtol=1e-5)
    swapped = peftlab.apply(copy.deepcopy(base), _lora(arch))  # hot swap reads it too
    peftlab.hotswap_adapter(swapped, tmp_path / "peft")
    torch.testing.assert_close(_logits(swapped, batch), want, atol=1e-5, rtol=1e-5)


def test_peft_file_with_other_embedding_weights_is_refused(batch, tmp_path):
    base = TINY["llama"]()
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens"])
    )
    with torch.no_grad():
        pm.get_input_embeddings().base_layer.weight.add_(1.0)  # a "resized, trained" table
    with pytest.warns(UserWarning):
        pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.AdapterFileError, match="differ from this model's"):
        peftlab.load_adapter(model, tmp_path / "peft")
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_into_a_tied_embedding_keeps_the_head_and_saves_untied(batch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = peftlab.apply(TINY["gpt2"](), _lora("gpt2"))
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().base_layer.weight  # tied
    head_before = head.detach().clone()
    _perturb(model)
    want = _logits(model, batch)
    peftlab.merge(model)
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    peftlab.unmerge(model)
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    plain = peftlab.merge_and_unload(model)
    assert isinstance(plain.get_input_embeddings(), torch.nn.Embedding)
    assert plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(again, batch), want, atol=1e-5, rtol=1e-5)


def test_mixed_batch_rows_use_their_own_embedding_adapter(batch):
    model = TINY["llama"]()
    for i, name in enumerate(("a", "b")):
        peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["embed_tokens"]), name)
        _perturb_adapter(model, name, seed=i)
    want = {}
    for name in ("a", "b"):
        peftlab.set_adapter(model, name)
        want[name] = _logits(model, batch)
    with peftlab.disable_adapters(model):
        want[None] = _logits(model, batch)
    with peftlab.adapter_rows(model, ["b", None]):
        got = _logits(model, batch)
    torch.testing.assert_close(got[0], want["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[None][1], atol=1e-5, rtol=1e-5)


def _perturb_adapter(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_combining_embedding_adapters_adds_their_updates(batch):
    model = TINY["llama"]()
    for i, name in enumerate(("a", "b")):
        peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["embed_tokens"]), name)
        _perturb_adapter(model, name, seed=i)
    layer = model.get_input_embeddings()
    want = layer.delta_weight("a") * 0.5 + layer.delta_weight("b") * 2.0
    peftlab.combine(model, {"a": 0.5, "b": 2.0}, "cat")
    torch.testing.assert_close(layer.delta_weight("combined"), want, atol=1e-5, rtol=1e-5)


def test_hotswap_and_loraplus_see_the_embedding_factors(batch, tmp_path):
    from peftlab.train.config import TrainConfig
    from peftlab.train.optim import optimizer_for

    model = peftlab.apply(TINY["llama"](), _lora("llama"))
    other = peftlab.apply(TINY["llama"](), _lora("llama", alpha=16))
    _perturb(other, seed=3)
    want = _logits(other, batch)
    peftlab.save_adapter(other, tmp_path / "other")
    peftlab.hotswap_adapter(model, tmp_path / "other")
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    opt = optimizer_for(model, TrainConfig(lr=1e-3, loraplus_lr_ratio=16.0))
    fast = {id(p) for g in opt.param_groups if g["lr"] == pytest.approx(16e-3) for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["model.embed_tokens.lora_embedding_B.default.weight"]) in fast
    assert id(named["model.embed_tokens.lora_embedding_A.default.weight"]) not in fast


def test_qlora_keeps_the_embedding_in_float_and_adapts_it(batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = TINY["llama"]()
    model = peftlab.apply(
        copy.deepcopy(base),
        peftlab.QLoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"], blocksize=64),
    )
    embed = model.get_input_embeddings()
    assert isinstance(embed, LoRAEmbedding) and embed.base_layer.weight.dtype == torch.float32
    _perturb(model)
    want = _logits(model, batch)
    peftlab.save_adapter(model, tmp_path / "q")
    again = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "q")
    torch.testing.assert_close(_logits(again, batch), want, atol=1e-5, rtol=1e-5)


def test_training_moves_the_embedding_factors(batch):
    model = peftlab.apply(TINY["llama"](), _lora("llama"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    a = model.get_input_embeddings().lora_A["default"].weight
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert a.abs().sum() > 0  # from zero: the lookup's gradient reached A
    seen = set(batch.flatten().tolist())
    unseen = [t for t in range(128) if t not in seen]
    assert torch.count_nonzero(a[:, unseen]) == 0  # sparse in A: only the ids in the batch


@pytest.mark.parametrize(
    "config, match",
    [
        (peftlab.DoRAConfig(target_modules=["embed_tokens"]), "DoRALinear does not adapt"),
        (peftlab.LoRAConfig(target_modules=["embed_tokens"], init="pissa"), "init='pissa'"),
        (peftlab.IA3Config(target_modules=["embed_tokens"]), "LoRA and QLoRA adapters only"),
    ],
)
def test_refusals_are_one_line_and_leave_the_model(config, match, batch):
    model = TINY["llama"]()
    want = _logits(model, batch)
    with pytest.raises(ConfigError, match=match):
        peftlab.apply(model, config)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(_logits(model, batch), want)


def test_an_embedding_with_max_norm_is_refused():
    model = TINY["llama"]()
    model.get_input_embeddings().max_norm = 1.0
    with pytest.raises(ConfigError, match="max_norm=1.0"):
        peftlab.apply(model, peftlab.LoRAConfig(target_modules=["embed_tokens"]))


# -- the estimator: what it counts for an embedding target, against apply and autograd


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_estimator_counts_the_embedding_factors_and_the_gradient_they_start(method, arch):
    from peftlab.select.estimator import estimate_memory
    from peftlab.select.models import plan
    from peftlab.select.presets import from_model
    from tests.unit.test_estimator import _saved_bytes

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = peftlab.config_from_dict(
        {
            "method": method,
            "r": 4,
            "target_modules": [EMBED[arch], LINEAR[arch]],
            "modules_to_save": [],
            **({"blocksize": 64} if method == "qlora" else {}),
        }  # fmt: skip
    )
    model = TINY[arch]()
    arch_ = from_model(model)
    p = plan(arch_, cfg)
    assert p.embedding_adapted
    est = estimate_memory(arch_, cfg, 3, 16, "float32", device="cpu", chunked_loss=False)
    peftlab.apply(model, cfg)
    assert p.trainable == peftlab.trainable_parameters(model)[0]
    if method == "qlora":
        return  # the 4-bit layers' saved tensors are test_estimator's (same rules)
    model.train()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids if arch == "llama" else torch.tensor([0, 1, 1])
    measured = _saved_bytes(model, ids, labels)
    # 2%: the gradient into block 0 alone adds 3.6% (llama) / 6.3% (bert) here
    assert est.detail["saved_activations"] == pytest.approx(measured, rel=0.02), measured


@pytest.mark.parametrize("method", ["dora", "vera", "loha"])
def test_estimator_names_the_embedding_table_for_methods_that_cannot_adapt_it(method):
    from peftlab.select.estimator import estimate_memory

    cfg = peftlab.config_from_dict({"method": method, "target_modules": ["embed_tokens", "q_proj"]})
    with pytest.raises(ConfigError, match="'embed_tokens' is smollm2-135m's embedding table"):
        estimate_memory("smollm2-135m", cfg, 1, 16)


def test_a_scaled_embedding_scales_the_update_as_peft_does():
    """Gemma multiplies its lookup by embed_scale (√d); the update is scaled the same way, and
    the merge into its (tied) table stays exact."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    base = GemmaForCausalLM(cfg).eval()
    assert getattr(base.get_input_embeddings(), "embed_scale", None) is not None
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on tied layers
        pm = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens"])
        )
    ours = peftlab.apply(
        copy.deepcopy(base), peftlab.LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens"])
    )
    _perturb(pm)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                mine[n.removeprefix("base_model.model.") + ".weight"].copy_(p)
    want = _logits(pm, ids)
    assert not torch.allclose(want, _logits(base, ids))
    torch.testing.assert_close(_logits(ours, ids), want, atol=1e-5, rtol=1e-5)
    peftlab.merge(ours)
    torch.testing.assert_close(_logits(ours, ids), want, atol=1e-5, rtol=1e-5)
