"""Prefix-Tuning and P-Tuning v2: parity with peft, generation, folding, checkpointing, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.state import adapter_configs
from tests.conftest import TINY, tiny_bert, tiny_llama


def _randomize(model, seed=0, scale=1.0):
    """Give every trainable parameter a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _left_padded(batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_matches_peft_prefix_tuning_with_gqa():
    """Same prefix table → same logits as peft's prefix tuning (prefix_projection=False)."""
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny_llama()  # 4 query heads, 2 key/value heads
    p = 4
    ref = get_peft_model(
        copy.deepcopy(base),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=False),
    )
    model = peftlab.apply(
        copy.deepcopy(base), peftlab.PrefixTuningConfig(num_virtual_tokens=p, reparam=False)
    )
    table = model.peftlab_prefix.prefix_table.default
    # Shaped by the key/value heads: 2 layers · (k, v) · 2 kv heads · head_dim 8.
    assert table.shape == (p, 2 * 2 * 2 * 8)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape))
        ref.prompt_encoder.default.embedding.weight.copy_(table)
    ids, mask = _left_padded()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        # peft lets the model number the real tokens after the prefix (p, p+1, ...); peftlab
        # keeps their un-prefixed positions unless told, so give it peft's positions here.
        positions = torch.arange(p, p + ids.shape[1]).unsqueeze(0)
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the prefix does change the output


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_generate_matches_loop_of_full_forwards(arch, method):
    """Batched greedy generate() with the KV cache == argmax of full forwards, left padding."""
    model = TINY[arch]()
    peftlab.apply(
        model,
        peftlab.config_from_dict({"method": method, "num_virtual_tokens": 5, "reparam_hidden": 16}),
    )
    _randomize(model)
    ids, mask = _left_padded()
    new = 8
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
        seq, m = ids, mask
        for _ in range(new):
            positions = (m.cumsum(-1) - 1).clamp(min=0)  # what generate() gives a padded batch
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq[:, ids.shape[1] :])
    with torch.no_grad(), peftlab.disable_adapters(model):
        base = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, model(input_ids=ids, attention_mask=mask).logits, atol=1e-3)


def test_fold_gives_the_same_outputs_and_drops_the_mlp(tmp_path, batch):
    model = tiny_llama()
    peftlab.apply(model, peftlab.PrefixTuningConfig(num_virtual_tokens=4, reparam_hidden=16))
    _randomize(model, scale=0.1)
    with torch.no_grad():
        before = model(input_ids=batch).logits

    # save_adapter stores the folded table without touching the model.
    peftlab.save_adapter(model, tmp_path / "a")
    assert any("prefix_mlp" in n for n, _ in model.named_parameters())
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == ["base_model.model.peftlab_prefix.prefix_table"]
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path / "a")
    assert adapter_configs(loaded)["default"].reparam is False
    assert not any(
        "prefix_mlp" in n or "prefix_embedding" in n for n, _ in loaded.named_parameters()
    )

    peftlab.fold_prefix(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["peftlab_prefix.prefix_table.default"]
    assert adapter_configs(model)["default"].reparam is False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(loaded(input_ids=batch).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_trains_with_gradient_checkpointing(method, arch, reentrant, batch):
    """Checkpointed layers get the prefix too: same loss and gradients as without."""
    results = []
    for checkpointing in (False, True):
        model = TINY[arch]()
        peftlab.apply(
            model,
            peftlab.config_from_dict(
                {"method": method, "num_virtual_tokens": 3, "reparam_hidden": 16}
            ),
        )
        _randomize(model, scale=0.1)
        model.train()
        for m in model.modules():  # dropout off, so both runs compute the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            for m in model.modules():
                if getattr(m, "gradient_checkpointing", False) and hasattr(
                    m, "_gradient_checkpointing_func"
                ):
                    fn = m._gradient_checkpointing_func
                    m._gradient_checkpointing_func = lambda *a, _fn=fn, _c=calls, **k: (
                        _c.append(1) or _fn(*a, **k)
                    )
        labels = torch.tensor([0, 1]) if arch == "bert" else batch
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, len(calls)))
    (loss0, grads0, _), (loss1, grads1, n_checkpointed) = results
    assert n_checkpointed == 2  # both layers really ran under checkpointing
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert grads0[name].abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)


def test_ptuning_v2_defaults():
    config = peftlab.PTuningV2Config(num_virtual_tokens=4)
    assert config.reparam is False
    clf = peftlab.apply(tiny_bert(), config)
    trainable = sorted(n for n, p in clf.named_parameters() if p.requires_grad)
    # The new classification head trains with the prompts (modules_to_save resolved to it).
    assert adapter_configs(clf)["default"].modules_to_save == ("classifier",)
    assert trainable == [
        "classifier.bias",
        "classifier.weight",
        "peftlab_ptuning.ptuning_table.default",
    ]
    lm = peftlab.apply(tiny_llama(), peftlab.PTuningV2Config(num_virtual_tokens=4))
    assert adapter_configs(lm)["default"].modules_to_save is None
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == [
        "peftlab_ptuning.ptuning_table.default"
    ]


def test_two_adapters_switch(batch):
    model = tiny_llama()
    peftlab.apply(model, peftlab.PrefixTuningConfig(num_virtual_tokens=3, reparam=False), "a")
    peftlab.apply(model, peftlab.PrefixTuningConfig(num_virtual_tokens=5, reparam=False), "b")
    with torch.no_grad():
        out_b = model(input_ids=batch).logits
        peftlab.set_adapter(model, "a")
        out_a = model(input_ids=batch).logits
    assert not torch.allclose(out_a, out_b)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "peftlab_prefix.prefix_table.a"
    ]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_virtual_tokens_must_be_positive(bad):
    for cls in (peftlab.PrefixTuningConfig, peftlab.PTuningV2Config):
        with pytest.raises(ConfigError, match="num_virtual_tokens"):
            cls(num_virtual_tokens=bad)


def test_architecture_without_cache_is_refused():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4)
    )
    with pytest.raises(ConfigError, match="cache-capable attention"):
        peftlab.apply(model, peftlab.PTuningV2Config(num_virtual_tokens=4))
    assert not hasattr(model, "peftlab_ptuning")


def test_sliding_window_attention_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
        )
    )
    with pytest.raises(ConfigError, match="full attention"):
        peftlab.apply(model, peftlab.PrefixTuningConfig(num_virtual_tokens=4))


def test_misuse_of_masks_and_caches_is_explained(batch):
    model = peftlab.apply(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ConfigError, match="2-D attention mask"):
        model(input_ids=batch, attention_mask=torch.ones(2, 1, 9, 9))
    out = model(input_ids=batch, use_cache=True)  # gradients on: a read-only prefix cache
    with pytest.raises(ConfigError, match="holds only the prefix"):
        model(input_ids=batch[:, :1], cache=out.cache)


def test_inference_reuses_the_reparameterized_table_until_it_changes(batch):
    torch.manual_seed(0)
    model = peftlab.apply(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=3))
    model.eval()
    with torch.enable_grad():
        ref = model(input_ids=batch).logits.detach()
    with torch.no_grad():
        first = model(input_ids=batch).logits
        encoder = next(m for m in model.modules() if hasattr(m, "_inference_table"))
        assert encoder.__dict__["_table_cache"], "no table was cached"
        torch.testing.assert_close(first, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(input_ids=batch).logits, ref, atol=1e-6, rtol=0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # an optimizer step: the cache must not be reused
        changed = model(input_ids=batch).logits
    with torch.enable_grad():
        ref2 = model(input_ids=batch).logits.detach()
    torch.testing.assert_close(changed, ref2, atol=1e-6, rtol=0)
    assert not torch.allclose(changed, ref)
