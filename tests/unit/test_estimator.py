"""Memory estimator: closed forms against peftlab.apply, saved tensors against autograd, peak
against the allocator (tiny models), presets against published parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.registry import get_method
from peftlab.select.estimator import OPTIMIZER_BYTES, estimate_memory
from peftlab.select.models import (
    MODELS,
    NOT_MODELLED,
    method_fields,
    modelled_methods,
    plan,
    unaccounted,
)
from peftlab.select.plans import nf4_bits
from peftlab.select.presets import PRESETS, from_model, resolve_architecture
from peftlab.train.optim import OPTIMIZERS, make_optimizer
from tests.conftest import tiny_bert, tiny_llama
from tests.estimator_support import _allocator_peak_of, _config

METHODS = modelled_methods()


@pytest.mark.parametrize("method", METHODS)
def test_defaults_mirror_the_method_config(method):
    """The estimator reads fields the config class has, with that class's defaults."""
    cfg = _config(method)
    read = MODELS[method].fields
    fields = get_method(method).config_cls().to_dict()
    assert read and set(read) <= set(fields)
    assert method_fields(method) == (method, {k: fields[k] for k in read})
    given = {k: v for k, v in cfg.to_dict().items() if k in read or k == "modules_to_save"}
    assert method_fields(cfg)[1] == {**method_fields(method)[1], **given}
    assert cfg.method == method


def test_every_builtin_method_has_a_memory_model():
    assert set(METHODS) == set(peftlab.methods())


def test_every_registered_method_is_modelled_or_listed_as_not_modelled():
    """A new method needs a row in MODELS (plan, fields, priors) or a reason in NOT_MODELLED."""
    assert unaccounted() == []
    assert not set(MODELS) & set(NOT_MODELLED)
    assert all(reason.strip() for reason in NOT_MODELLED.values())


def test_registering_a_method_without_a_model_is_caught(monkeypatch):
    import dataclasses

    from peftlab.core import registry

    @dataclasses.dataclass(frozen=True)
    class IA3Config(peftlab.MethodConfig):
        pass

    spec = registry.MethodSpec("ia3-test", IA3Config, lambda m, c, n: None, "ia3_")
    monkeypatch.setattr(IA3Config, "method", "ia3-test", raising=False)
    monkeypatch.setitem(registry._REGISTRY, "ia3-test", spec)
    assert unaccounted() == ["ia3-test"]
    monkeypatch.setitem(NOT_MODELLED, "ia3-test", "no closed form yet")
    assert unaccounted() == []
    with pytest.raises(ConfigError, match=r"no model of method 'ia3-test' \(no closed form yet\)"):
        estimate_memory("smollm2-135m", "ia3-test")
    assert "ia3-test" not in {r.method for r in peftlab.recommend("smollm2-135m", 4)}


def test_a_method_without_memory_plan_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(MODELS, "prompt")
    monkeypatch.setitem(NOT_MODELLED, "prompt", "left out in this test")
    with pytest.raises(ConfigError, match="no model of method 'prompt' .*; known: .*lora"):
        estimate_memory("smollm2-135m", "prompt")
    assert "prompt" not in modelled_methods()
    assert "prompt" not in {r.method for r in peftlab.recommend("smollm2-135m", 4)}


@pytest.mark.parametrize(
    "arch,saved",
    [("llama", None), ("llama", []), ("bert", None), ("bert", []), ("bert", ["classifier"])],
)
@pytest.mark.parametrize("method", METHODS)
def test_trainable_closed_form_matches_apply(method, arch, saved):
    """``modules_to_save`` given explicitly here; the default (None) is the head rule, checked
    against the explicit ``["classifier"]`` in :func:`test_every_method_trains_a_new_head`."""
    cfg = _config(method).replace(modules_to_save=saved)
    model = (tiny_llama if arch == "llama" else tiny_bert)()
    predicted = plan(from_model(model), cfg).trainable
    peftlab.apply(model, cfg)
    assert predicted == peftlab.trainable_parameters(model)[0]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_new_head(method):
    """The rule ``peftlab.apply`` follows for every method: ``modules_to_save=None`` trains a
    classification model's new head (as ``["classifier"]`` does), ``[]`` opts out; a language
    model has no new head."""
    if method == "full":
        pytest.skip("full fine-tuning trains every parameter, the head included")
    cfg = _config(method)
    bert = from_model(tiny_bert())
    default = plan(bert, cfg)
    assert default.head_trainable
    assert default.trainable == plan(bert, cfg.replace(modules_to_save=["classifier"])).trainable
    off = plan(bert, cfg.replace(modules_to_save=[]))
    assert not off.head_trainable
    assert default.trainable - off.trainable == bert.classifier_params() == 32 * 2 + 2
    llama = from_model(tiny_llama())
    assert not plan(llama, cfg).head_trainable
    assert plan(llama, cfg).trainable == plan(llama, cfg.replace(modules_to_save=[])).trainable


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("llama", "all-linear"),
        ("llama", ["q_proj", "v_proj"]),
        ("llama", r"model\.layers\.0\.self_attn\.(q|k)_proj"),
        ("llama", ["lm_head"]),
        ("bert", "all-linear"),
        ("bert", ["dense"]),
        ("bert", r".*\.1\.attention\.self\.query"),
    ],
)
def test_targets_match_find_targets(arch, targets):
    """The estimator runs core/matching's predicate over the architecture's qualified names and
    selects exactly what ``find_targets`` selects in the model, block by block."""
    from peftlab.core.matching import find_targets
    from peftlab.select.plans import target_linears

    model = (tiny_llama if arch == "llama" else tiny_bert)()
    assert set(target_linears(from_model(model), targets)) == set(find_targets(model, targets))
    cfg = peftlab.LoRAConfig(r=4, target_modules=targets, modules_to_save=[])
    predicted = plan(from_model(model), cfg).trainable
    peftlab.apply(model, cfg)
    assert predicted == peftlab.trainable_parameters(model)[0]


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapter_sites_match_find_adapter_sites(arch, placement):
    from peftlab.methods.adapter import find_adapter_sites
    from peftlab.select.plans import adapter_sites

    model = (tiny_llama if arch == "llama" else tiny_bert)()
    assert list(adapter_sites(from_model(model), placement)) == find_adapter_sites(model, placement)


def test_target_errors_name_the_entry():
    with pytest.raises(ConfigError, match="target module 'query' matches no linear layer"):
        estimate_memory("smollm2-135m", {"method": "lora", "target_modules": ["q_proj", "query"]})
    with pytest.raises(ConfigError, match="not a valid regex"):
        estimate_memory("smollm2-135m", {"method": "lora", "target_modules": "q_proj("})


def test_one_optimizer_table_for_the_factory_and_the_estimator():
    """Every optimizer the trainer builds is estimated and vice versa; paged ones cost their
    unpaged twin on CUDA and torch AdamW where the factory falls back to it."""
    assert set(OPTIMIZERS) == set(OPTIMIZER_BYTES)
    p = torch.nn.Parameter(torch.zeros(4, 4))
    for name in OPTIMIZERS:
        assert estimate_memory("smollm2-135m", "lora", 1, 64, optimizer=name).optimizer_states > 0
    for name in ("sgd", "adam9"):
        with pytest.raises(ConfigError, match=f"optimizer='{name}' is invalid.*adamw_8bit"):
            estimate_memory("smollm2-135m", "lora", optimizer=name)
        with pytest.raises(ConfigError, match=f"optimizer='{name}' is invalid"):
            make_optimizer([p], name)

    def est(name, device):
        return estimate_memory("llama-2-7b", "lora", 1, 512, optimizer=name, device=device)

    for paged, twin in [("paged_adamw_8bit", "adamw_8bit"), ("paged_adamw_32bit", "adamw")]:
        assert est(paged, "cuda").peak == est(twin, "cuda").peak
        assert est(paged, "cpu").peak == est("adamw", "cpu").peak
    assert est("adamw_8bit", "cuda").optimizer_states < 0.3 * est("adamw", "cuda").optimizer_states


def _saved_bytes(model, ids, labels):
    """Bytes autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_saved_activations_match_autograd(method, arch, attention):
    cfg = _config(method)
    model = (tiny_llama if arch == "llama" else tiny_bert)()
    model.config._attn_implementation = attention
    est = estimate_memory(
        from_model(model),
        cfg,
        3,
        16,
        "float32",
        attention=attention,
        device="cpu",
        chunked_loss=False,  # the model's own (plain) loss runs below
    )
    peftlab.apply(model, cfg)
    model.train()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids if arch == "llama" else torch.tensor([0, 1, 1])
    measured = _saved_bytes(model, ids, labels)
    assert est.detail["saved_activations"] == pytest.approx(measured, rel=0.05)


def _allocator_peak(model, opt, ids):
    """Peak live tensor bytes of one training step with the model's own loss."""

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _allocator_peak_of(model, opt, step)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])
def test_peak_within_15_percent_of_allocator_peak(method):
    """The issue's 15% on a tiny Llama: predicted peak vs the allocator's measured peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _config(method)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    # the model's own (plain) loss runs in _allocator_peak
    est = estimate_memory(
        from_model(model), cfg, 4, 32, "float32", device="cpu", chunked_loss=False
    )
    peftlab.apply(model, cfg)
    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # fused
    ids = torch.randint(0, 512, (4, 32))
    measured = _allocator_peak(model, opt, ids)
    assert abs(est.peak / measured - 1) < 0.15, (est.peak, measured)


@pytest.mark.parametrize(
    "name,billions",
    [
        ("llama-2-7b", 6.738),
        ("llama-2-13b", 13.016),
        ("llama-2-70b", 68.977),
        ("llama-3-8b", 8.030),
        ("mistral-7b", 7.242),
        ("qwen2.5-7b", 7.616),
        ("smollm2-135m", 0.1345),
        ("minilm-l6", 0.0227),
    ],
)
def test_presets_give_published_parameter_counts(name, billions):
    assert PRESETS[name].total_params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_smollm2_preset_matches_the_bundled_config():
    from peftlab.models import SMOLLM2, cache_dir

    path = cache_dir() / "models" / SMOLLM2
    if not (path / "config.json").exists():
        pytest.skip("SmolLM2 is not cached on this machine")
    from peftlab.select.presets import from_hf_config

    real = from_hf_config(json.loads((path / "config.json").read_text()))
    assert real.total_params() == PRESETS["smollm2-135m"].total_params()


def test_nf4_bits_and_13b_weights():
    assert nf4_bits(64, True) == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits(64, False) == 4.5
    lora = estimate_memory("llama-2-13b", "lora", 1, 512, "bfloat16")
    assert lora.weights / 1e9 == pytest.approx(26.0, abs=0.2)
    q = estimate_memory("llama-2-13b", "qlora", 1, 512, "bfloat16")
    assert q.weights < 0.35 * lora.weights


def test_checkpointing_cuts_activations_and_parts_add_up():
    a = estimate_memory("llama-2-7b", "lora", 4, 1024)
    b = estimate_memory("llama-2-7b", "lora", 4, 1024, gradient_checkpointing=True)
    assert b.detail["saved_activations"] < 0.2 * a.detail["saved_activations"]
    parts = a.weights + a.gradients + a.optimizer_states + a.activations + a.workspace
    assert a.peak == parts
    full = estimate_memory("llama-2-7b", "full", 1, 512, optimizer="adamw")
    assert full.optimizer_states == pytest.approx(8 * full.trainable_params)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="Known presets: .*llama-2-13b"):
        resolve_architecture("llama-9-99b")
    with pytest.raises(ConfigError, match="optimizer"):
        estimate_memory("smollm2-135m", "lora", optimizer="adam9")
    with pytest.raises(ConfigError, match="dtype"):
        estimate_memory("smollm2-135m", "lora", dtype="int3")
    with pytest.raises(ConfigError, match="batch_size"):
        estimate_memory("smollm2-135m", "lora", batch_size=0)
    with pytest.raises(ConfigError, match="no model of method"):
        estimate_memory("smollm2-135m", "no-such-method")


def test_methods_never_import_select_bench_train_or_cli():
    """Module-level and function-level imports alike: the methods know nothing of the
    estimator, the recommender, the trainer, the bench or the CLI."""
    import ast
    from pathlib import Path

    forbidden = {"select", "bench", "train", "cli"}
    bad = []
    for path in sorted((Path(peftlab.__file__).parent / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for m in modules:
                parts = m.split(".")
                if parts[0] == "peftlab" and len(parts) > 1 and parts[1] in forbidden:
                    bad.append(f"{path.name}:{node.lineno} imports {m}")
    assert bad == []


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize(
    "arch, patterns",
    [
        ("llama", {"rank_pattern": {"q_proj": 8, "layers.1.mlp.down_proj": 2}}),
        ("llama", {"alpha_pattern": {"v_proj": 4}, "layers_to_transform": 1}),
        (
            "bert",
            {"rank_pattern": {"query": 6}, "layers_to_transform": [0], "layers_pattern": "layer"},
        ),  # fmt: skip
    ],
)
def test_trainable_closed_form_follows_rank_patterns_and_layers(method, arch, patterns):
    """Per-module ranks (rank_pattern) and a subset of the layers (layers_to_transform): the
    estimator counts what apply trains, and its per-block ranks sum to the same."""
    cfg = peftlab.config_from_dict({"method": method, "r": 4, "target_modules": "all-linear",
                                    "modules_to_save": [], **patterns})  # fmt: skip
    model = (tiny_llama if arch == "llama" else tiny_bert)()
    p = plan(from_model(model), cfg)
    peftlab.apply(model, cfg)
    assert p.trainable == peftlab.trainable_parameters(model)[0]
    layers = from_model(model).layers
    ranks = [m.lora_A["default"].weight.shape[0] for m in model.modules() if hasattr(m, "lora_A")]
    assert sum(p.targets.values()) * layers == pytest.approx(sum(ranks))
