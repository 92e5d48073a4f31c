"""The core: config validation and round-trip, target matching, named adapters, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftlab
from peftlab import AdapterFileError, ConfigError
from peftlab.core.state import adapter_configs, state_of
from tests.conftest import TINY, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
    ],
)
def test_bad_lora_values_name_the_key(kwargs, key):
    for cls in (peftlab.LoRAConfig, peftlab.DoRAConfig):
        with pytest.raises(ConfigError, match=rf"^{key}=.* must be"):
            cls(**kwargs)


def test_config_round_trips_json_and_yaml():
    import yaml

    cfg = peftlab.DoRAConfig(
        r=8, alpha=16, target_modules=["q_proj"], use_rslora=True, detach_norm=False
    )
    assert peftlab.config_from_dict(json.loads(cfg.to_json())) == cfg
    assert peftlab.config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.to_dict()["method"] == "dora"


def test_unknown_option_and_method_are_errors():
    with pytest.raises(ConfigError, match="unknown option.*'rank'.*known options"):
        peftlab.config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="unknown method 'lorra'; registered methods: .*lora"):
        peftlab.config_from_dict({"method": "lorra"})


def test_methods_lists_registry():
    assert {"full", "lora", "dora"} <= set(peftlab.methods())


def test_target_that_matches_nothing_lists_linear_modules():
    with pytest.raises(ConfigError, match=r"'q_prog' matches no module.*q_proj \(×2\).*down_proj"):
        peftlab.apply(tiny_llama(), peftlab.LoRAConfig(target_modules=["q_proj", "q_prog"]))
    with pytest.raises(ConfigError, match="regex .* matched no module"):
        peftlab.apply(tiny_llama(), peftlab.LoRAConfig(target_modules=r".*\.nothing"))
    with pytest.raises(ConfigError, match="not linear layers: .*LlamaRMSNorm"):
        peftlab.apply(tiny_llama(), peftlab.LoRAConfig(target_modules=["input_layernorm"]))


def test_target_forms_resolve():
    from peftlab.core.matching import find_targets

    m = tiny_llama()
    assert len(find_targets(m, "all-linear")) == 2 * 7  # q k v o gate up down per layer
    assert "lm_head" not in find_targets(m, "all-linear")
    assert find_targets(m, r"model\.layers\.0\.self_attn\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    # GPT-2's Conv1D layers count as linear; its tied lm_head does not.
    assert len(find_targets(tiny_gpt2(), "all-linear")) == 2 * 4


def test_rslora_scaling():
    assert peftlab.LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert peftlab.LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_gaussian_init_keeps_b_zero():
    m = peftlab.apply(
        tiny_llama(), peftlab.LoRAConfig(r=4, init="gaussian", target_modules=["q_proj"])
    )
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() == 0
    assert 0.1 < layer.lora_A["default"].weight.std().item() * 4 < 2.0


def test_a_different_method_on_the_same_layers_is_refused():
    m = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4))
    with pytest.raises(ConfigError, match="already carries adapter.*'default'.*merge_and_unload"):
        peftlab.apply(m, peftlab.DoRAConfig(r=4), adapter_name="other")
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        peftlab.apply(m, peftlab.LoRAConfig(r=4))


def _perturb_b(model, name, value):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{name}." in n:
                p.fill_(value)


def test_named_adapters_switch_and_disable(batch):
    base = tiny_llama()
    ref = base(input_ids=batch).logits.detach()
    m = peftlab.apply(
        copy.deepcopy(base), peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    peftlab.apply(m, peftlab.LoRAConfig(r=2, target_modules=["v_proj"]), adapter_name="second")
    _perturb_b(m, "default", 0.05)
    _perturb_b(m, "second", -0.05)
    # Only the active adapter trains.
    assert all(".second." in n for n, p in m.named_parameters() if p.requires_grad)
    out_second = m(input_ids=batch).logits.detach()
    peftlab.set_adapter(m, "default")
    assert all(".default." in n for n, p in m.named_parameters() if p.requires_grad)
    out_default = m(input_ids=batch).logits.detach()
    assert not torch.allclose(out_default, out_second)
    with peftlab.disable_adapters(m):
        torch.testing.assert_close(m(input_ids=batch).logits.detach(), ref)
    torch.testing.assert_close(m(input_ids=batch).logits.detach(), out_default)
    # Disabling a merged model unmerges it first; merging again restores the adapted output.
    peftlab.merge(m)
    with peftlab.disable_adapters(m):
        torch.testing.assert_close(m(input_ids=batch).logits.detach(), ref, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="no adapter named 'third'"):
        peftlab.set_adapter(m, "third")


def _saved(tmp_path, arch="llama", **kw):
    m = peftlab.apply(
        TINY[arch](), peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **kw)
    )
    peftlab.save_adapter(m, tmp_path)
    return tmp_path


def test_adapter_with_wrong_shapes_names_them(tmp_path):
    path = _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        AdapterFileError,
        match=r"shape mismatches .*q_proj\.lora_A\.weight: file \(4, 32\) vs model \(4, 48\)",
    ):
        peftlab.load_adapter(other, path)
    assert state_of(other) is None  # a failed load leaves the model as it was


@pytest.mark.parametrize("merged", [False, True])
def test_refused_load_keeps_the_adapters_already_there(tmp_path, merged):
    """A second adapter whose file does not fit must not cost the user the first one."""
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path / "good")
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors[sorted(tensors)[0]]
    save_file(tensors, path / "adapter_model.safetensors")  # now missing a key

    torch.manual_seed(0)
    m = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()  # "trained": the adapter changes the output
    batch = torch.randint(0, 128, (2, 6))
    ref = m(input_ids=batch).logits.detach()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    if merged:
        peftlab.merge(m)
    with pytest.raises(AdapterFileError, match="missing keys"):
        peftlab.load_adapter(m, path, adapter_name="second")
    assert list(peftlab.core.model.adapter_configs(m)) == ["default"]
    assert not any(".second." in n for n, _ in m.named_parameters())
    torch.testing.assert_close(m(input_ids=batch).logits.detach(), ref, atol=1e-5, rtol=0)
    if merged:
        peftlab.unmerge(m)
        torch.testing.assert_close(m(input_ids=batch).logits.detach(), ref, atol=1e-5, rtol=0)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def test_unload_restores_modules_to_save_and_merge_keeps_them():
    torch.manual_seed(0)
    cfg = peftlab.LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    for merge in (False, True):
        m = tiny_bert()
        before = {k: v.clone() for k, v in m.classifier.state_dict().items()}
        peftlab.apply(m, cfg)
        assert all(p.requires_grad for p in m.classifier.parameters())
        with torch.no_grad():
            m.classifier.weight.add_(1.0)  # "trained" in place
        trained = m.classifier.weight.clone()
        m = peftlab.merge_and_unload(m) if merge else peftlab.unload(m)
        expected = trained if merge else before["weight"]
        torch.testing.assert_close(m.classifier.weight.detach(), expected)
        assert state_of(m) is None


def test_adapter_with_missing_keys_names_them(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=r"missing keys \['" + dropped.replace(".", r"\.")):
        peftlab.load_adapter(tiny_llama(), path)


def test_corrupt_and_pickled_adapter_files(tmp_path):
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file.*corrupt"):
        peftlab.load_adapter(tiny_llama(), path)
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        peftlab.load_adapter(tiny_llama(), path)
    (path / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        peftlab.load_adapter(tiny_llama(), path)
    with pytest.raises(AdapterFileError, match="adapter_config.json not found"):
        peftlab.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_save_refuses_to_overwrite(tmp_path):
    path = _saved(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    m = peftlab.apply(tiny_llama(seed=9), peftlab.LoRAConfig(r=4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        peftlab.save_adapter(m, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    peftlab.save_adapter(m, path, overwrite=True)
    assert not list(path.glob("*.tmp"))


def test_merge_refused_without_adapter():
    with pytest.raises(ConfigError, match="carries no peftlab adapter"):
        peftlab.merge(tiny_llama())


def test_modules_to_save_trains_and_saves_the_head(tmp_path, batch):
    m = peftlab.apply(
        TINY["bert"](),
        peftlab.LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    assert m.classifier.weight.requires_grad
    with torch.no_grad():
        m.classifier.weight.add_(1.0)
    peftlab.save_adapter(m, tmp_path)
    loaded = peftlab.load_adapter(TINY["bert"](), tmp_path)
    torch.testing.assert_close(loaded.classifier.weight, m.classifier.weight)
    with pytest.raises(ConfigError, match="'head' matches no module"):
        peftlab.apply(TINY["bert"](), peftlab.LoRAConfig(modules_to_save=["head"]))


def test_refused_apply_leaves_the_model_trainable_as_before():
    m = tiny_llama()
    with pytest.raises(ConfigError):
        peftlab.apply(m, peftlab.LoRAConfig(target_modules=["nope"]))
    assert all(p.requires_grad for p in m.parameters())
    assert state_of(m) is None


# -- one rule for the head, frozen configs, strict types ------------------------------------


def test_apply_and_train_agree_on_the_classification_head(tmp_path):
    """peftlab.apply(bert, LoRAConfig()) trains the new head, as peftlab train does."""
    from peftlab.train import train
    from tests.tiny_lm import char_tokenizer

    config = peftlab.LoRAConfig(r=4)
    applied = peftlab.apply(tiny_bert(), config)
    assert config.modules_to_save is None  # the caller's config is not changed
    assert adapter_configs(applied)["default"].modules_to_save == ("classifier",)
    rows = ["text,label"] + [f"{'good' if i % 2 else 'bad'} film {i},{i % 2}" for i in range(24)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    trained = tiny_bert()
    train(
        {
            "model": "unused",
            "method": "lora",
            "method_args": {"r": 4},
            "data": str(tmp_path / "d.csv"),
            "eval_size": 8,
            "max_steps": 1,
            "batch_size": 8,
            "progress": False,
            "output_dir": str(tmp_path / "run"),
        },
        model=trained,
        tokenizer=char_tokenizer(),
    )

    def trainable(m):
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    assert "classifier.weight" in trainable(applied)
    assert trainable(trained) == trainable(applied)
    # [] opts out; explicit names resolve by suffix; a language model has no head to add.
    bare = peftlab.apply(tiny_bert(), peftlab.LoRAConfig(r=4, modules_to_save=[]))
    assert not bare.classifier.weight.requires_grad
    lm = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4))
    assert adapter_configs(lm)["default"].modules_to_save is None


def test_merge_inside_disable_adapters_is_refused(batch):
    m = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4, target_modules=["q_proj"]))
    _perturb_b(m, "default", 0.05)
    out = m(input_ids=batch).logits.detach()
    with peftlab.disable_adapters(m):
        for op in (peftlab.merge_and_unload, peftlab.merge):
            with pytest.raises(ConfigError, match="leave the disable_adapters block first"):
                op(m)
    torch.testing.assert_close(m(input_ids=batch).logits.detach(), out)
    plain = peftlab.merge_and_unload(m)  # outside the block it merges what was trained
    torch.testing.assert_close(plain(input_ids=batch).logits.detach(), out, atol=1e-5, rtol=0)


def test_lora_dropout_follows_eval_mode(batch):
    m = peftlab.apply(tiny_llama(), peftlab.LoRAConfig(r=4, dropout=0.5))
    _perturb_b(m, "default", 0.5)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=batch).logits, m(input_ids=batch).logits)
        m.train()
        assert not torch.equal(m(input_ids=batch).logits, m(input_ids=batch).logits)


def test_fold_prefix_records_the_new_config_through_the_core():
    config = peftlab.PrefixTuningConfig(num_virtual_tokens=2, reparam_hidden=8)
    m = peftlab.apply(tiny_llama(), config)
    peftlab.fold_prefix(m)
    assert adapter_configs(m)["default"] == config.replace(reparam=False)
    assert config.reparam is True
    from peftlab.core.state import replace_config

    with pytest.raises(ConfigError, match="cannot be recorded as a LoRAConfig"):
        replace_config(m, "default", peftlab.LoRAConfig())


def test_apply_on_a_merged_model(batch):
    """A refused apply leaves a merged model merged, bit for bit; an accepted one builds the
    new adapter on the base weights (DoRA's magnitude is ‖W0‖, so the output is the base's)."""
    ref = tiny_llama()(input_ids=batch).logits.detach()
    m = peftlab.apply(tiny_llama(), peftlab.DoRAConfig(r=4, target_modules=["q_proj"]))
    _perturb_b(m, "default", 0.05)
    peftlab.merge(m)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="'nope' matches no module"):
        peftlab.apply(m, peftlab.DoRAConfig(r=4, target_modules=["nope"]), "second")
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    assert m.model.layers[0].self_attn.q_proj.merged == ["default"]
    peftlab.apply(m, peftlab.DoRAConfig(r=4, target_modules=["q_proj"]), "second")
    torch.testing.assert_close(m(input_ids=batch).logits.detach(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["merge_and_unload", "merge"])
def test_merging_an_adapted_tied_head_leaves_the_input_embeddings_alone(how):
    # SmolLM2 and GPT-2 tie lm_head to the input embeddings: a merge that wrote the head's
    # update into the shared tensor also changed every input embedding (0.74 relative logit
    # change on SmolLM2 before the fix).
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    embed0 = model.get_input_embeddings().weight.detach().clone()
    peftlab.apply(model, peftlab.LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    if how == "merge":
        peftlab.merge(model)
    else:
        model = peftlab.merge_and_unload(model)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(model.get_input_embeddings().weight, embed0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not model.config.tie_word_embeddings  # a saved model does not re-tie them
