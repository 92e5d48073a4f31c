"""peftlab.combine and peftlab.hotswap_adapter: the invariants of each combination method for
LoRA, rsLoRA, DoRA and QLoRA, save/reload (peftlab and peft), hot swap, and every refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo.testing

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.io import AdapterFileError
from peftlab.methods.lora import LoRALinear
from tests.conftest import tiny_llama

VARIANTS = {
    "lora": (peftlab.LoRAConfig, {}),
    "rslora": (peftlab.LoRAConfig, {"use_rslora": True}),
    "dora": (peftlab.DoRAConfig, {}),
    "qlora": (peftlab.QLoRAConfig, {}),
}
TARGETS_A, TARGETS_B = ["q_proj", "v_proj"], ["q_proj", "k_proj"]


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}" in n and "lora_" in n:
                scale = 0.1 if "magnitude" not in n else 0.05 * p.abs().mean()
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _with_adapters(variant, second=True, base=None, targets_b=TARGETS_B):
    """A tiny Llama with adapter a (r=4, alpha=8) and b (r=2, alpha=3), both random."""
    cls, extra = VARIANTS[variant]
    model = base if base is not None else tiny_llama()
    peftlab.apply(model, cls(r=4, alpha=8, target_modules=TARGETS_A, **extra), "a")
    _randomize(model, "a", 1)
    if second:
        peftlab.apply(model, cls(r=2, alpha=3, target_modules=targets_b, **extra), "b")
        _randomize(model, "b", 2)
    return model


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _delta(model, name):
    """Layer → the adapter's directional update s·B·A (zeros where it is absent)."""
    out = {}
    for n, layer in _layers(model):
        if name in layer.lora_A:
            out[n] = layer.delta_weight(name).detach().double()
        else:
            out[n] = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    return out


def _mag(model, name):
    """Layer → DoRA's m − ‖W0‖ (zeros where the adapter is absent)."""
    out = {}
    for n, layer in _layers(model):
        m0 = peftlab.core.weights.dense_weight(layer.base_layer).detach().double().norm(dim=1)
        vec = layer.lora_magnitude_vector.get(name) if name in layer.lora_A else None
        out[n] = torch.zeros_like(m0) if vec is None else vec.detach().double() - m0
    return out


def _close(got: dict, want: dict, atol=1e-6):
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


def _logits(model, name=None, ids=None):
    if name is not None:
        peftlab.set_adapter(model, name)
    ids = torch.arange(2, 20).view(2, 9) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def _sum(*terms):
    keys = terms[0][1].keys()
    return {k: sum(w * d[k] for w, d in terms) for k in keys}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_invariants(variant):
    """One part at weight 1 is itself (linear, cat, full-rank svd); cat is the exact weighted
    sum; weights scale linearly; dare_linear at density 1 is the linear sum, dare_ties is
    ties; DoRA's magnitudes follow the same rule as m − ‖W0‖."""
    model = _with_adapters(variant)
    da, db = _delta(model, "a"), _delta(model, "b")
    ref = _logits(model, "a")
    for method in ("linear", "cat", "svd"):
        res = peftlab.combine(model, {"a": 1}, method, new_name=f"one_{method}")
        assert res.relative_error < 1e-12 and peftlab.core.model.active_adapter(model) == res.name
        _close(_delta(model, res.name), da)
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    layer = dict(_layers(model))["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_A["one_linear"].weight, layer.lora_A["a"].weight)
    assert torch.equal(layer.lora_B["one_linear"].weight, layer.lora_B["a"].weight)
    w = {"a": 0.3, "b": -2.0}
    want = _sum((0.3, da), (-2.0, db))
    for method, kw in [("cat", {}), ("svd", {}), ("dare_linear", {"density": 1.0})]:
        res = peftlab.combine(model, w, method, new_name=method, **kw)
        assert res.rank == 6
        _close(_delta(model, method), want)
    _close(_delta(model, "cat"), want, atol=1e-6)
    peftlab.combine(model, {"a": 0.3}, "linear", new_name="scaled")
    _close(_delta(model, "scaled"), _sum((0.3, da)))
    peftlab.combine(model, w, "ties", density=1.0, rank=32, new_name="ties1")
    peftlab.combine(model, w, "dare_ties", density=1.0, rank=32, new_name="dt1")
    _close(_delta(model, "dt1"), _delta(model, "ties1"))
    if variant == "dora":
        ma, mb = _mag(model, "a"), _mag(model, "b")
        _close(_mag(model, "one_cat"), ma)
        _close(_mag(model, "cat"), _sum((0.3, ma), (-2.0, mb)))
        _close(_mag(model, "scaled"), _sum((0.3, ma)))


def _ties_reference(deltas, weights, density):
    """TIES written out independently: trim each to its ⌈d·n⌉ largest |entries|, weight,
    elect the sign of the sum, average the agreeing non-zero entries."""
    trimmed = []
    for d, w in zip(deltas, weights):
        k = math.ceil(density * d.numel())
        cut = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(w * torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    sign = stack.sum(0).sign()
    agree = (stack.sign() == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_ties_and_dare_against_references():
    model = _with_adapters("lora")
    da, db = _delta(model, "a"), _delta(model, "b")
    for density in (1.0, 0.3):
        name = f"t{int(density * 10)}"
        res = peftlab.combine(
            model, {"a": 0.7, "b": 1.5}, "ties", density=density, rank=32, new_name=name
        )
        assert res.relative_error < 1e-10
        want = {k: _ties_reference([da[k], db[k]], [0.7, 1.5], density) for k in da}
        _close(_delta(model, name), want)
    # One part: TIES at density 1 is the linear form; a low rank is reported as approximate.
    peftlab.combine(model, {"a": 0.5}, "ties", density=1.0, new_name="t_one")
    _close(_delta(model, "t_one"), _sum((0.5, da)))
    assert (
        peftlab.combine(
            model, {"a": 1, "b": 1}, "ties", density=0.5, rank=1, new_name="lo"
        ).relative_error
        > 0.01
    )
    # DARE: seeded (same seed, same adapter), unbiased rescale (kept entries are τ/density).
    for name, seed in (("d0", 0), ("d0b", 0), ("d1", 1)):
        peftlab.combine(
            model, {"a": 1.0}, "dare_linear", density=0.5, rank=32, seed=seed, new_name=name
        )
    d0, d0b, d1 = (_delta(model, n) for n in ("d0", "d0b", "d1"))
    _close(d0, d0b, atol=0)
    assert any(not torch.allclose(d0[k], d1[k]) for k in d0)
    for k in d0:  # every entry dropped (0) or kept and rescaled (2τ), about half of each
        assert torch.minimum(d0[k].abs(), (d0[k] - 2 * da[k]).abs()).max() < 1e-6
        if da[k].any():
            assert 0.3 < (d0[k].abs() > 1e-6).double().mean() < 0.7


def test_linear_refuses_factors_that_differ_and_missing_layers_count_as_zero():
    model = _with_adapters("lora", targets_b=["v_proj", "k_proj"])
    peftlab.apply(model, peftlab.LoRAConfig(r=4, alpha=8, target_modules=TARGETS_A), "c")
    _randomize(model, "c", 3)
    before = _logits(model)
    with pytest.raises(ConfigError, match="cross terms"):
        peftlab.combine(model, {"a": 0.5, "c": 0.5}, "linear")
    with pytest.raises(ConfigError, match="needs one rank"):
        peftlab.combine(model, {"a": 0.5, "b": 0.5}, "linear")
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    assert sorted(peftlab.core.model.adapter_configs(model)) == ["a", "b", "c"]
    # Shared A (b's B copied from c's shape would differ; use a with its A shared by c).
    with torch.no_grad():
        for _, layer in _layers(model):
            if "c" in layer.lora_A:
                layer.lora_A["c"].weight.copy_(layer.lora_A["a"].weight)
    peftlab.combine(model, {"a": 0.5, "c": 2.0}, "linear", new_name="shared")
    _close(_delta(model, "shared"), _sum((0.5, _delta(model, "a")), (2.0, _delta(model, "c"))))
    # a adapts q and v, b adapts v and k: the union, each missing part a zero.
    res = peftlab.combine(model, {"a": 1.0, "b": 1.0}, "cat", new_name="union")
    assert res.rank == 6
    _close(_delta(model, "union"), _sum((1.0, _delta(model, "a")), (1.0, _delta(model, "b"))))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_combined_adapter_saves_and_reloads(variant, tmp_path):
    base = tiny_llama()
    model = _with_adapters(variant, base=copy.deepcopy(base))
    peftlab.combine(model, {"a": 0.5, "b": 1.5}, "cat", new_name="ab")
    want = _logits(model, "ab")
    peftlab.save_adapter(model, tmp_path / "ab", adapter_name="ab")
    fresh = copy.deepcopy(base)
    if variant == "qlora":  # the same 4-bit base: quantize it the way the parts did
        fresh = _with_adapters("qlora", second=False, base=fresh)
    peftlab.load_adapter(fresh, tmp_path / "ab", adapter_name="ab")
    torch.testing.assert_close(_logits(fresh, "ab"), want, rtol=0, atol=1e-5)
    if variant in ("lora", "rslora", "dora"):
        peft = pytest.importorskip("peft")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ab").eval()
        torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def two_loras():
    """One model for every refusal (each must leave it as it was) and its logits."""
    model = _with_adapters("lora")
    return model, _logits(model)


@pytest.mark.parametrize(
    "weights, method, kw, match",
    [
        ({}, "cat", {}, "weights={} is invalid"),
        ([("a", 1.0)], "cat", {}, "weights="),
        ({"zz": 1.0}, "cat", {}, "no adapter named 'zz'"),
        ({"a": float("nan")}, "cat", {}, r"weights\['a'\]=nan"),
        ({"a": float("inf")}, "cat", {}, r"weights\['a'\]=inf"),
        ({"a": True}, "cat", {}, r"weights\['a'\]=True"),
        ({"a": 1.0}, "mean", {}, "method='mean' is invalid"),
        ({"a": 1.0}, "ties", {}, "density=None is invalid"),
        ({"a": 1.0}, "ties", {"density": 0.0}, "density=0.0 is invalid"),
        ({"a": 1.0}, "dare_ties", {"density": 1.5}, "density=1.5 is invalid"),
        ({"a": 1.0}, "linear", {"density": 0.5}, "density=0.5 is only used by"),
        ({"a": 1.0}, "svd", {"rank": 0}, "rank=0 is invalid"),
        ({"a": 1.0}, "cat", {"rank": 4}, "rank=4 is only used by"),
        ({"a": 1.0}, "cat", {"new_name": "b"}, "new_name='b' is taken"),
        ({"a": 1.0}, "cat", {"new_name": "a b"}, "new_name='a b' is invalid"),
        ({"a": 1.0}, "dare_linear", {"density": 0.5, "seed": 1.5}, "seed=1.5 is invalid"),
    ],
)
def test_refusals_leave_the_model_unchanged(two_loras, weights, method, kw, match):
    model, before = two_loras
    with pytest.raises(ConfigError, match=match) as err:
        peftlab.combine(model, weights, method, **kw)
    assert "\n" not in str(err.value)
    assert sorted(peftlab.core.model.adapter_configs(model)) == ["a", "b"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_refuses_other_methods():
    model = peftlab.apply(tiny_llama(), peftlab.IA3Config(), "x")
    with pytest.raises(ConfigError, match="combine takes LoRA-family"):
        peftlab.combine(model, {"x": 1.0})


def test_refuses_per_module_ranks_in_combine_and_hot_swap(tmp_path):
    cfg = peftlab.LoRAConfig(r=4, target_modules=TARGETS_A, alpha_pattern={"q_proj": 2})
    base = tiny_llama()
    model = peftlab.apply(copy.deepcopy(base), cfg, "x")
    with pytest.raises(ConfigError, match="per-module ranks or alphas"):
        peftlab.combine(model, {"x": 1.0})
    plain = peftlab.apply(copy.deepcopy(base), peftlab.LoRAConfig(r=4, target_modules=TARGETS_A))
    peftlab.save_adapter(model, tmp_path / "patterned")
    with pytest.raises(ConfigError, match="alpha_pattern/alpha differ"):
        peftlab.hotswap_adapter(plain, tmp_path / "patterned")


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_hotswap_equals_a_fresh_load_without_new_modules(variant, tmp_path):
    base = tiny_llama()
    cls, _ = VARIANTS[variant]
    for i, (alpha, rslora) in enumerate([(8, False), (5, True)]):
        m = peftlab.apply(
            copy.deepcopy(base), cls(r=4, alpha=alpha, use_rslora=rslora, target_modules=TARGETS_A)
        )
        _randomize(m, "default", 10 + i)
        peftlab.save_adapter(m, tmp_path / str(i))
    model = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "0")
    layer = model.model.layers[0].self_attn.q_proj
    compiled = torch.compile(layer, backend=(counter := torch._dynamo.testing.CompileCounter()))
    x = torch.randn(3, 32)
    with torch.no_grad():  # the second call compiles the layer's cached plan (lora.py)
        compiled(x), compiled(x)
    frames = counter.frame_count
    ids = [id(m) for m in model.modules()] + [id(p) for p in model.parameters()]
    peftlab.hotswap_adapter(model, tmp_path / "1")
    assert ids == [id(m) for m in model.modules()] + [id(p) for p in model.parameters()]
    fresh = peftlab.load_adapter(copy.deepcopy(base), tmp_path / "1")
    torch.testing.assert_close(_logits(model), _logits(fresh), rtol=0, atol=1e-5)
    with torch.no_grad():
        want = fresh.model.layers[0].self_attn.q_proj(x)
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=1e-5)
    # No recompilation after a swap (DoRA's norm is computed in the graph when compiled: a
    # cache keyed on the tensors' write counters would make dynamo recompile).
    peftlab.hotswap_adapter(model, tmp_path / "0")
    with torch.no_grad():
        compiled(x)
    assert counter.frame_count == frames
    # Merged: unmerged, swapped, merged again.
    peftlab.merge(model)
    peftlab.hotswap_adapter(model, tmp_path / "0")
    assert layer.merged == ["default"]
    torch.testing.assert_close(
        _logits(model),
        _logits(peftlab.load_adapter(copy.deepcopy(base), tmp_path / "0")),
        rtol=0,
        atol=1e-5,
    )


def test_hotswap_refusals(tmp_path):
    base = tiny_llama()
    for name, cfg in [
        ("r2", peftlab.LoRAConfig(r=2, target_modules=TARGETS_A)),
        ("dora", peftlab.DoRAConfig(r=4, target_modules=TARGETS_A)),
        ("other", peftlab.LoRAConfig(r=4, target_modules=["q_proj"])),
    ]:
        peftlab.save_adapter(peftlab.apply(copy.deepcopy(base), cfg), tmp_path / name)
    model = peftlab.apply(copy.deepcopy(base), peftlab.LoRAConfig(r=4, target_modules=TARGETS_A))
    _randomize(model, "default", 4)
    before = _logits(model)
    state = peftlab.core.io.adapter_state_dict(model)
    cases = [
        (tmp_path / "r2", ConfigError, "r=2 vs the adapter's r=4"),
        (tmp_path / "dora", ConfigError, "method 'dora'"),
        (tmp_path / "other", AdapterFileError, "missing keys"),
        (tmp_path / "nowhere", AdapterFileError, "not found"),
        ({k: v * float("nan") for k, v in state.items()}, AdapterFileError, "non-finite"),
        ({k: v[:1] for k, v in state.items()}, AdapterFileError, "shape mismatches"),
    ]
    for source, exc, match in cases:
        with pytest.raises(exc, match=match):
            peftlab.hotswap_adapter(model, source)
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        peftlab.hotswap_adapter(model, state, adapter_name="x")
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    peftlab.hotswap_adapter(model, {k: 2 * v for k, v in state.items()})  # a bare state works
    assert not torch.equal(_logits(model), before)


def test_cli_combines_saves_and_scores(tiny_dir, tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.models import load_model

    for i in range(2):
        m = peftlab.apply(load_model(tiny_dir), peftlab.LoRAConfig(r=4, target_modules=TARGETS_A))
        _randomize(m, "default", 20 + i)
        peftlab.save_adapter(m, tmp_path / f"a{i}")
    a, b, out = tmp_path / "a0", tmp_path / "a1", tmp_path / "out"
    argv = ["combine", "--model", tiny_dir, "--adapters", f"a={a}:0.5,b={b}:0.5", "--out", str(out)]
    evals = ["--eval-data", "builtin:sort", "builtin:reverse", "--eval-size", "2"]
    assert main([*argv, "--method", "ties", "--density", "0.5", *evals]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ties combination 'combined' (r=8, relative error")
    assert lines[1].split() == [
        "adapter",
        *["builtin:sort", "loss", "builtin:sort", "exact_match", "(95%", "interval,", "n=2)"],
        *["builtin:reverse", "loss", "builtin:reverse", "exact_match", "(95%", "interval,", "n=2)"],
    ]
    assert "0.000 (0.000-0.658)" in lines[2]  # the base model: 0 of 2, Wilson interval
    assert [r.split(maxsplit=2)[:2] for r in lines[2:]][0] == ["(base", "model)"]
    assert [r.split()[0] for r in lines[3:]] == ["a", "b", "combined"]
    assert peftlab.read_adapter_config(out).r == 8
    # The saved adapter is the cat of the parts: reload it and compare with the two loaded.
    assert main([*argv, "--method", "cat", "--overwrite"]) == 0
    both = load_model(tiny_dir)
    for name, path in (("a", a), ("b", b)):
        peftlab.load_adapter(both, path, adapter_name=name)
    peftlab.combine(both, {"a": 0.5, "b": 0.5}, "cat")
    reloaded = peftlab.load_adapter(load_model(tiny_dir), out)
    torch.testing.assert_close(_logits(reloaded), _logits(both), rtol=0, atol=1e-5)
    capsys.readouterr()
    bad = [
        ([*argv, "--method", "cat"], "exists and is not empty"),
        (
            [
                "combine",
                "--model",
                tiny_dir,
                "--adapters",
                f"a={a}:x",
                "--out",
                str(tmp_path / "o"),
            ],
            "is not a number",
        ),
        (
            ["combine", "--model", tiny_dir, "--adapters", f"a{a}", "--out", str(tmp_path / "o")],
            "is invalid",
        ),
        (
            [
                "combine",
                "--model",
                tiny_dir,
                "--adapters",
                f"a={a}:nan",
                "--out",
                str(tmp_path / "o"),
            ],
            "finite",
        ),
        (
            [
                "combine",
                "--model",
                tiny_dir,
                "--adapters",
                f"a={tmp_path}/none",
                "--out",
                str(tmp_path / "o"),
            ],
            "no such adapter",
        ),
        ([*argv[:-1], str(tmp_path / "o"), "--method", "linear"], "cross terms"),
        ([*argv[:-1], str(tmp_path / "o"), "--method", "svd", "--rank", "0"], "rank=0 is invalid"),
    ]
    for args, match in bad:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()  # transformers' load bar comes first
        assert match in err[-1] and err[-1].startswith("peftlab combine: error:")
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o").exists()
