"""Parity and interop with peft (the reference implementation) for LoRA, rsLoRA and DoRA, and
LoRA with per-module ranks and alphas on a subset of the layers (rank_pattern, alpha_pattern,
layers_to_transform).

Given identical A, B (and m) values, peftlab and peft must compute the same outputs and the
same gradients with respect to the inputs; adapters saved by either load in the other.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from tests.conftest import TINY

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value"]}
VARIANTS = {
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "use_rslora": True},
    "dora": {"method": "dora"},
    "patterns": {"method": "lora"},
}


def _patterns(variant: str, targets) -> dict:
    """The patterns variant: the first target at rank 6, the second at alpha 3, layer 1 only."""
    if variant != "patterns":
        return {}
    return {"rank_pattern": {targets[0]: 6}, "alpha_pattern": {targets[1]: 3},
            "layers_to_transform": [1]}  # fmt: skip


def _peft_model(base, variant: str, targets):
    d = VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=d.get("use_rslora", False),
        use_dora=d["method"] == "dora",
        **_patterns(variant, targets),
    )
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _ours(base, variant: str, targets):
    d = {**VARIANTS[variant], "r": 4, "alpha": 8, "target_modules": targets}
    d.update(_patterns(variant, targets))
    return peftlab.apply(copy.deepcopy(base), peftlab.config_from_dict(d))


def _randomize_and_copy(pm, ours, seed=0):
    """Random values into peft's A, B, m; the same values into ours (names map 1:1)."""
    g = torch.Generator().manual_seed(seed)
    ours_params = dict(ours.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" not in name:
                continue
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            ours_name = name.removeprefix("base_model.model.")
            ours_name = ours_name.replace(
                "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"
            )
            ours_params[ours_name].copy_(p)
            n += 1
    assert n > 0


def _forward(model, batch):
    emb = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    out.pow(2).mean().backward()
    return out.detach(), emb.grad


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_and_input_grads_match_peft(tiny_arch, variant, batch):
    base = TINY[tiny_arch]()
    pm = _peft_model(base, variant, TARGETS[tiny_arch])
    ours = _ours(base, variant, TARGETS[tiny_arch])
    _randomize_and_copy(pm, ours)
    out_p, grad_p = _forward(pm, batch)
    out_o, grad_o = _forward(ours, batch)
    torch.testing.assert_close(out_o, out_p, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_p, rtol=0, atol=1e-5)
    # Parameter gradients agree too (the DoRA norm is detached in both).
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    for name, p in pm.named_parameters():
        if p.grad is None:
            continue
        key = name.removeprefix("base_model.model.").replace(
            "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"
        )
        torch.testing.assert_close(ours_grads[key], p.grad, rtol=1e-4, atol=1e-6)


def test_dora_magnitude_init_is_row_norm():
    base = TINY["llama"]()
    ours = _ours(base, "dora", ["q_proj"])
    layer = ours.model.layers[0].self_attn.q_proj
    expected = base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peftlab_adapter_loads_in_peft(tiny_arch, variant, batch, tmp_path):
    base = TINY[tiny_arch]()
    pm = _peft_model(base, variant, TARGETS[tiny_arch])
    ours = _ours(base, variant, TARGETS[tiny_arch])
    _randomize_and_copy(pm, ours, seed=5)
    peftlab.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=batch).logits, ours(input_ids=batch).logits, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_adapter_loads_in_peftlab(tiny_arch, variant, batch, tmp_path):
    base = TINY[tiny_arch]()
    pm = _peft_model(base, variant, TARGETS[tiny_arch])
    ours = _ours(base, variant, TARGETS[tiny_arch])
    _randomize_and_copy(pm, ours, seed=7)
    pm.save_pretrained(tmp_path)
    loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path)
    assert peftlab.read_adapter_config(tmp_path).method == VARIANTS[variant]["method"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=batch).logits, pm(input_ids=batch).logits, rtol=0, atol=1e-5
        )


def test_patterns_give_each_module_its_rank_and_scale_on_the_chosen_layers():
    base = TINY["llama"]()
    ours = _ours(base, "patterns", ["q_proj", "v_proj"])
    adapted = {n: m for n, m in ours.named_modules() if hasattr(m, "lora_A")}
    assert sorted(adapted) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    q, v = adapted["model.layers.1.self_attn.q_proj"], adapted["model.layers.1.self_attn.v_proj"]
    assert (q.lora_A["default"].weight.shape[0], q.scaling["default"]) == (6, 8 / 6)
    assert (v.lora_A["default"].weight.shape[0], v.scaling["default"]) == (4, 3 / 4)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"rank_pattern": {"k_proj": 8}}, "rank_pattern key 'k_proj' matches none"),
        ({"alpha_pattern": {"(q": 8}}, "not a valid regex"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj=0 is invalid"),
        (
            {"layers_to_transform": [7]},
            r"selects none of the targeted modules; their layer indices are \[0, 1\]",
        ),
        ({"layers_to_transform": []}, "a non-empty list"),
    ],
)
def test_bad_patterns_are_one_clear_error_and_the_model_is_unchanged(keys, match):
    from peftlab.core.config import ConfigError

    model = TINY["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        cfg = {"method": "lora", "target_modules": ["q_proj", "v_proj"], **keys}
        peftlab.apply(model, peftlab.config_from_dict(cfg))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_patterned_adapter_saves_and_loads_in_peftlab(batch, tmp_path):
    base = TINY["gpt2"]()
    ours = _ours(base, "patterns", TARGETS["gpt2"])
    _randomize_and_copy(_peft_model(base, "patterns", TARGETS["gpt2"]), ours, seed=3)
    peftlab.save_adapter(ours, tmp_path)
    loaded = peftlab.load_adapter(copy.deepcopy(base), tmp_path)
    assert peftlab.read_adapter_config(tmp_path).rank_pattern == {"c_attn": 6}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch).logits, ours(input_ids=batch).logits)


# ---- LoHa and LoKr (peft's LOHA and LOKR types) --------------------------------------------------------------


LYCORIS = {
    "loha": ("hada_", lambda t: peft.LoHaConfig(r=4, alpha=8, target_modules=t),
             lambda t: peftlab.LoHaConfig(r=4, alpha=8, target_modules=t)),
    "lokr": ("lokr_", lambda t: peft.LoKrConfig(r=2, alpha=4, target_modules=t),
             lambda t: peftlab.LoKrConfig(r=2, alpha=4, target_modules=t)),
    "lokr-both": ("lokr_", lambda t: peft.LoKrConfig(r=1, alpha=3, target_modules=t,
                                                      decompose_both=True),
                  lambda t: peftlab.LoKrConfig(r=1, alpha=3, target_modules=t,
                                               decompose_both=True)),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(LYCORIS))
@pytest.mark.parametrize("arch", ["llama", "bert"])  # peft reshapes Conv1D's dense update
def test_loha_and_lokr_match_peft_and_adapters_load_both_ways(arch, method, batch, tmp_path):
    prefix, peft_cfg, our_cfg = LYCORIS[method]
    base = TINY[arch]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg(TARGETS[arch]))
    ours = peftlab.apply(copy.deepcopy(base), our_cfg(TARGETS[arch]))
    assert {n.removeprefix("base_model.model.") for n, _ in theirs.named_parameters()
            if prefix in n} == {n for n, _ in ours.named_parameters() if prefix in n}  # fmt: skip
    g = torch.Generator().manual_seed(11)
    got = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                got[name.removeprefix("base_model.model.")].copy_(p)
    out_t, grad_t = _forward(theirs, batch)
    out_o, grad_o = _forward(ours, batch)
    torch.testing.assert_close(out_o, out_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_o, grad_t, rtol=0, atol=1e-5)
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(got[key].grad, p.grad, rtol=1e-4, atol=1e-6)
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    in_ours = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert peftlab.read_adapter_config(tmp_path / "theirs") == our_cfg(TARGETS[arch]).replace(
        target_modules=sorted(TARGETS[arch])
    )
    with torch.no_grad():
        want = theirs.eval()(input_ids=batch).logits
        torch.testing.assert_close(in_peft(input_ids=batch).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(in_ours(input_ids=batch).logits, want, rtol=0, atol=1e-5)
