"""Methods on architecture families whose layouts differ from Llama's, GPT-2's and BERT's:
a head that calls past the transformer body (OPT), multi-query attention (Falcon), norms named
after attention (GPT-NeoX, ModernBERT), and IA³'s defaults on types peft's table lacks."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import peftlab
from peftlab import ConfigError
from peftlab.methods.adapter import find_adapter_sites
from peftlab.methods.ia3 import IA3Linear
from tests.conftest import MORE, _tiny, tiny_llama


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning-v2"])
def test_virtual_tokens_reach_opt_whose_head_skips_the_base_model(method, batch):
    """OPTForCausalLM calls model.decoder, not model: a hook on OPTModel never ran, so the
    soft prompt or prefix was silently ignored and nothing trained."""
    base = MORE["opt"]()
    model = peftlab.apply(copy.deepcopy(base), peftlab.config_from_dict(
        {"method": method, "num_virtual_tokens": 4}))  # fmt: skip
    loss = _loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=batch).logits, base(input_ids=batch).logits)


class _Bypass(nn.Module):
    """A model whose forward calls its body's ``forward`` directly, past the body's hooks."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    @property
    def base_model(self):
        return self.lm.model

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, input_ids=None, **kw):
        hidden = self.lm.model.forward(input_ids=input_ids).last_hidden_state
        return self.lm.lm_head(hidden)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_forward_that_never_reaches_the_body_is_an_error_not_a_silent_no_op(method, batch):
    model = peftlab.apply(_Bypass(tiny_llama()), peftlab.config_from_dict(
        {"method": method, "num_virtual_tokens": 4}))  # fmt: skip
    with pytest.raises(ConfigError, match="without calling LlamaModel.*had no effect"):
        model(input_ids=batch)
    with peftlab.disable_adapters(model):  # nothing to put in: no error
        model(input_ids=batch)


def test_prefix_on_multi_query_falcon_uses_the_cache_it_fills(batch):
    """Falcon's config says 4 key/value heads; its multi-query attention caches one."""
    model = MORE["falcon"]()
    assert model.config.num_kv_heads == 4 and model.config.multi_query
    peftlab.apply(
        model, peftlab.config_from_dict({"method": "ptuning-v2", "num_virtual_tokens": 3})
    )
    table = dict(model.named_parameters())["peftlab_ptuning.ptuning_table.default"]
    assert table.shape == (3, 2 * 2 * 1 * 8)  # layers · (k, v) · 1 head · head size 8
    _loss(model, batch).backward()
    assert table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "arch,sites",
    [
        ("gpt_neox", ["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.0.mlp.dense_4h_to_h"]),
        ("modernbert", ["model.layers.0.attn.Wo", "model.layers.0.mlp.Wo"]),
    ],
)
def test_bottleneck_sites_skip_norms_named_after_attention(arch, sites):
    """GPT-NeoX lists post_attention_layernorm before attention, ModernBERT attn_norm before
    attn: the first child named like attention was a norm, and placement failed."""
    assert find_adapter_sites(MORE[arch](), "houlsby")[:2] == sites


# IA³ without target_modules: peft's table where it has the type, else read from the blocks.
IA3_LAYERS = {
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),  # peft's table
    "opt": ("q_proj", "k_proj", "fc2"),  # peft's table
    "phi3": ("qkv_proj", "down_proj"),  # read: fused q/k/v, FFN output
    "modernbert": ("Wqkv", "mlp.Wo"),  # read
}


@pytest.mark.parametrize("arch", sorted(IA3_LAYERS))
def test_ia3_defaults_reach_types_outside_the_table(arch, batch):
    model = peftlab.apply(MORE[arch](), peftlab.IA3Config())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    block0 = sorted(n for n in layers if ".0." in n)
    assert {n.rsplit(".", 1)[-1] for n in block0} == {
        e.rsplit(".", 1)[-1] for e in IA3_LAYERS[arch]
    }
    ffn = [n for n, m in layers.items() if m.feedforward["default"]]
    assert len(ffn) == 2 and all(n.endswith(IA3_LAYERS[arch][-1]) for n in ffn)


def test_ia3_read_defaults_load_in_peft_with_the_same_logits(batch, tmp_path):
    """StableLM is not in peft's table: the layers read from its blocks are written out as a
    list of names, which peft applies to the same layers."""
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    base = _tiny("StableLmConfig", "StableLmForCausalLM", 0, **fields)
    model = peftlab.apply(copy.deepcopy(base), peftlab.IA3Config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(0.3 * torch.randn_like(p))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert names == {"k_proj", "v_proj", "down_proj"}
    peftlab.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=batch).logits, model(input_ids=batch).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_ia3_on_a_type_it_cannot_read_names_the_fix():
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128,
                  num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = _tiny("MixtralConfig", "MixtralForCausalLM", 0, **fields)
    with pytest.raises(ConfigError, match=r"no default for model_type 'mixtral'.*pass target_"):
        peftlab.apply(model, peftlab.IA3Config())
    assert not any(isinstance(m, IA3Linear) for m in model.modules())


def _t5():
    return _tiny("T5Config", "T5ForConditionalGeneration", 0, d_model=32, d_ff=64, num_layers=2,
                 num_heads=4, d_kv=8, decoder_start_token_id=0)  # fmt: skip


def _seq2seq_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch, labels=batch[:, :5].contiguous()).logits


@pytest.mark.parametrize("method", ["lora", "ia3", "vera", "qlora"])
def test_layer_methods_run_on_t5_which_reads_its_layers_weights(method, batch, tmp_path):
    """T5's feed-forward casts its input to ``self.wo.weight.dtype``: a wrapper without
    ``weight`` raised AttributeError; under QLoRA a 4-bit ``wo`` made the input uint8, so the
    layers T5 keeps in float32 (``_keep_in_fp32_modules``) keep a float base."""
    args = {"lora": {"r": 4, "target_modules": "all-linear"}, "qlora": {"r": 4}}
    base = _t5()
    model = peftlab.apply(copy.deepcopy(base), peftlab.config_from_dict(
        {"method": method, **args.get(method, {})}))  # fmt: skip
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    if method != "vera":  # VeRA's defaults are q/v: wo is not wrapped
        assert wo is not base.encoder.block[0].layer[1].DenseReluDense.wo
        assert wo.weight is wo.base_layer.weight and wo.weight.dtype == torch.float32
    if method == "qlora":
        q = model.encoder.block[0].layer[0].SelfAttention.q
        assert q.weight.dtype == torch.uint8  # the other layers are 4-bit
    model.train()
    model(input_ids=batch, labels=batch[:, :5].contiguous()).loss.backward()
    with torch.no_grad():  # a non-trivial adapter (zero-init parts included)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    out = _seq2seq_logits(model.eval(), batch)
    peftlab.save_adapter(model, tmp_path)
    loaded = peftlab.load_adapter(_t5(), tmp_path)
    torch.testing.assert_close(_seq2seq_logits(loaded, batch), out, rtol=0, atol=0)
    plain = peftlab.merge_and_unload(model)
    torch.testing.assert_close(_seq2seq_logits(plain, batch), out, rtol=0, atol=2e-5)


def _bart():
    return _tiny("BartConfig", "BartForConditionalGeneration", 0, d_model=32,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4,
                 max_position_embeddings=64)  # fmt: skip


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_prompt_tuning_on_encoder_decoder_models_equals_peft(make, batch, tmp_path):
    """The prompt in front of the encoder's input, the decoder's cross-attention mask extended
    (Lester et al. on T5): logits and greedy generation equal peft's SEQ_2_SEQ_LM prompt
    tuning with one transformer submodule, with a padded row."""
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_transformer_submodules=1)).eval()  # fmt: skip
    ours = peftlab.apply(copy.deepcopy(base), peftlab.config_from_dict(
        {"method": "prompt", "num_virtual_tokens": 4}))  # fmt: skip
    with torch.no_grad():
        table = theirs.prompt_encoder["default"].embedding.weight
        table.normal_(0, 1, generator=torch.Generator().manual_seed(0))
        ours.peftlab_prompt.prompt_embeddings["default"].copy_(table)
    mask = torch.ones_like(batch)
    mask[1, 6:] = 0
    labels = batch[:, :5].contiguous()
    with torch.no_grad():
        mine = ours(input_ids=batch, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(mine, theirs(input_ids=batch, attention_mask=mask,
                                                labels=labels).logits, rtol=0, atol=1e-6)  # fmt: skip
        assert not torch.allclose(mine, base(input_ids=batch, attention_mask=mask,
                                             labels=labels).logits)  # fmt: skip
        kw = dict(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(**kw), theirs.generate(**kw))
    ours.train()
    ours(input_ids=batch, attention_mask=mask, labels=labels).loss.backward()
    assert ours.peftlab_prompt.prompt_embeddings["default"].grad.abs().sum() > 0
    peftlab.save_adapter(ours, tmp_path)
    loaded = peftlab.load_adapter(make(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch, attention_mask=mask,
                                          labels=labels).logits, mine, rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_prefix_methods_refuse_encoder_decoder_models(method):
    model = _t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="encoder-decoder model.*use 'prompt' or a layer"):
        peftlab.apply(model, peftlab.config_from_dict({"method": method, "num_virtual_tokens": 4}))
    assert model.state_dict().keys() == before.keys()
    assert not any(type(m).__module__.startswith("peftlab") for m in model.modules())


def test_tie_weights_on_a_wrapped_head_ties_the_wrapped_layer():
    """transformers' tie_weights() sets ``lm_head.weight = wte.weight``; with LoRA on the head
    that reaches the wrapped layer (no stray parameter on the wrapper, no KeyError)."""
    from tests.conftest import tiny_gpt2

    model = peftlab.apply(tiny_gpt2(), peftlab.LoRAConfig(r=2, target_modules=["lm_head"]))
    model.lm_head.base_layer.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.tie_weights()
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "weight" not in model.lm_head._parameters  # nothing stray on the wrapper itself
