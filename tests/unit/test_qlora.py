"""QLoRA: 4-bit NF4 base layers, storage, training, exact merges, peft interop, bad input."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.weights import dense_weight
from peftlab.methods.nf4 import Linear4bit, quantize_linear, quantized_memory
from peftlab.methods.qlora import QLoRAConfig
from peftlab.train.optim import make_optimizer
from tests.conftest import tiny_gpt2, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def _quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _perturb(model, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers ≥ 5 name
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _load_4bit(path):
    """The model saved at ``path``, loaded by transformers in NF4 with double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    )


def tiny_llama64(seed=0):
    """A tiny Llama whose rows are multiples of 64 wide, so bitsandbytes' own CPU kernels (which
    transformers and peft use) compute correctly on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


# -- config ---------------------------------------------------------------------------------


def test_config_defaults_round_trip_and_export(tmp_path):
    cfg = QLoRAConfig(r=4, use_dora=True, compute_dtype="bfloat16")
    assert (cfg.quant_type, cfg.double_quant, cfg.blocksize, cfg.target_modules) == (
        "nf4",
        True,
        64,
        "all-linear",
    )
    assert peftlab.config_from_dict(json.loads(cfg.to_json())) == cfg
    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4))
    peftlab.save_adapter(model, tmp_path)
    doc = json.loads((tmp_path / "adapter_config.json").read_text())
    assert doc["peft_type"] == "LORA" and doc["use_dora"] is False and doc["r"] == 4
    assert (
        doc["peftlab"]["config"]["quant_type"] == "nf4"
        and doc["peftlab"]["config"]["double_quant"] is True
    )
    assert peftlab.read_adapter_config(tmp_path) == QLoRAConfig(r=4)


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"quant_type": "NF4"}, "quant_type"),
        ({"blocksize": 100}, "blocksize"),
        ({"blocksize": 8192}, "blocksize"),
        ({"compute_dtype": "fp32"}, "compute_dtype"),
        ({"double_quant": "yes"}, "double_quant"),
    ],
)
def test_bad_config_is_a_clear_error(bad, key):
    with pytest.raises(ConfigError, match=rf"{key}=.* is invalid: {key} must be"):
        QLoRAConfig(**bad)


def test_model_without_quantizable_layers_is_an_error():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    with pytest.raises(ConfigError, match="matched nothing"):
        peftlab.apply(NoLinear(), QLoRAConfig())


def test_second_adapter_must_share_the_quantization():
    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4))
    with pytest.raises(ConfigError, match="same blocksize"):
        peftlab.apply(model, QLoRAConfig(r=4, blocksize=128), adapter_name="other")
    peftlab.apply(model, QLoRAConfig(r=2), adapter_name="other")  # same quantization: fine
    assert len(_quantized_layers(model)) == 14


# -- the 4-bit base -------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_targeted_layers_hold_nf4_weights_and_bits_per_param(double_quant):
    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4, double_quant=double_quant))
    layers = _quantized_layers(model)
    assert len(layers) == 2 * 7  # q k v o gate up down in both blocks; lm_head stays float
    for layer in layers.values():
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested is double_quant
        assert layer.weight.quant_state.blocksize == 64
    mem = quantized_memory(model)
    print(f"tiny llama double_quant={double_quant}: {mem}")
    assert mem["quantized_params"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    assert mem["quantized_weight_bytes"] == mem["quantized_params"] // 2
    if double_quant:
        assert 4.125 < mem["bits_per_param"] <= 4.2
    else:
        assert mem["bits_per_param"] == pytest.approx(4.5)


def test_double_quant_saves_three_eighths_of_a_bit():
    a = quantized_memory(peftlab.apply(tiny_llama(), QLoRAConfig(r=4, double_quant=True)))
    b = quantized_memory(peftlab.apply(tiny_llama(), QLoRAConfig(r=4, double_quant=False)))
    assert a["quantized_weight_bytes"] == b["quantized_weight_bytes"]
    assert a["quant_constant_bytes"] < b["quant_constant_bytes"] / 2
    # fp32 absmax per 64 weights (0.5 bit) → 8-bit absmax (0.125) + fp32 per 256 absmax: 0.373.
    assert b["bits_per_param"] - a["bits_per_param"] > 0.3


def test_nf4_dequantization_matches_an_independent_nf4_decoder():
    """Nearest NF4 code × block absmax, computed here from the float weights, for layers 32 and
    16 wide (bitsandbytes' own CPU decoder gets these shapes wrong; peftlab's does not)."""
    torch.manual_seed(0)
    for shape in [(16, 32), (96, 160), (64, 64)]:
        linear = nn.Linear(shape[1], shape[0])
        q = quantize_linear(linear, double_quant=False)
        code = q.weight.quant_state.code
        assert code.numel() == 16 and code.min() == -1 and code.max() == 1 and (code == 0).any()
        blocks = linear.weight.detach().reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        nearest = code[((blocks / absmax)[..., None] - code).abs().argmin(-1)] * absmax
        ours = dense_weight(q)
        agree = torch.isclose(ours, nearest.reshape(shape), rtol=0, atol=1e-6).float().mean().item()
        assert agree > 0.999, (shape, agree)  # exact midpoints may round either way
        x = torch.randn(3, shape[1])
        torch.testing.assert_close(q(x), x @ ours.T + linear.bias, rtol=1e-5, atol=1e-5)
        assert _rel(ours, linear.weight.detach()) < 0.12


def test_gpt2_conv1d_is_quantized_transposed_and_restored_on_merge():
    base = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 9))
    model = peftlab.apply(copy.deepcopy(base), QLoRAConfig(r=4))
    assert len(_quantized_layers(model)) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj
    assert _rel(_logits(model, ids), _logits(base, ids)) < 0.2
    plain = peftlab.merge_and_unload(model)
    from transformers.pytorch_utils import Conv1D

    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    assert plain.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # [in, out] as GPT-2 has


# -- training --------------------------------------------------------------------------------


def test_training_lowers_loss_changes_only_lora_and_keeps_4bit_weights_bit_identical():
    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    _logits(model, ids)  # an inference call first: it must not repack the stored codes
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    constants = {
        n: m.weight.quant_state.absmax.clone() for n, m in _quantized_layers(model).items()
    }
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    final = model(input_ids=ids, labels=ids).loss.item()
    print(f"tiny llama QLoRA loss {losses[0]:.4f} → {final:.4f}")
    assert final < losses[0] - 0.05
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{n} changed"
    for n, m in _quantized_layers(model).items():
        assert m.weight.dtype == torch.uint8 and torch.equal(
            m.weight.quant_state.absmax, constants[n]
        )
    assert any(
        not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4, gradient_checkpointing=checkpointing))
        _perturb(model)
        model.train()
        assert _checkpointing(model) is checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6)
    peftlab.unload(model)
    assert not _checkpointing(model)


def test_norms_kept_in_float32_for_a_bfloat16_model():
    model = tiny_llama().to(torch.bfloat16)
    peftlab.apply(model, QLoRAConfig(r=4, compute_dtype="bfloat16"))
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert all(m.compute_dtype == torch.bfloat16 for m in _quantized_layers(model).values())
    ids = torch.randint(0, 128, (1, 5))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- merging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_and_unload_dequantize_equals_unmerged_logits(make, use_dora):
    model = peftlab.apply(make(), QLoRAConfig(r=4, use_dora=use_dora))
    _perturb(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    out = _logits(model, ids)
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    quantized = layer.base_layer
    peftlab.merge(model)
    peftlab.unmerge(model)
    assert layer.base_layer is quantized  # unmerge restores the very same 4-bit layer
    w_expected = dense_weight(quantized).float() + layer.delta_weight("default").float()
    if use_dora:
        w_expected = (
            w_expected * (layer.lora_magnitude_vector["default"] / w_expected.norm(dim=1))[:, None]
        )
    plain = peftlab.merge_and_unload(model)
    assert not _quantized_layers(plain)
    rel = _rel(_logits(plain, ids), out)
    print(f"{make.__name__} use_dora={use_dora}: merged vs unmerged logits rel {rel:.2e}")
    assert rel < 1e-4
    torch.testing.assert_close(_logits(plain, ids), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        dense_weight(plain.get_submodule(name)).float(), w_expected, rtol=1e-5, atol=1e-6
    )


def test_merge_and_unload_requantized_logs_measured_drift(caplog):
    model = peftlab.apply(tiny_llama(), QLoRAConfig(r=4))
    _perturb(model, scale=0.02)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    exact = _logits(peftlab.merge_and_unload(copy.deepcopy(model)), ids)
    with caplog.at_level(logging.WARNING, logger="peftlab.qlora"):
        requantized = peftlab.merge_and_unload(model, dequantize=False)
    layers = _quantized_layers(requantized)
    assert len(layers) == 14 and all(type(m) is Linear4bit for m in layers.values())
    assert all("_peftlab_dense" not in m.__dict__ for m in requantized.modules())
    msg = next(
        r.getMessage() for r in caplog.records if "re-quantized 14 merged layers" in r.getMessage()
    )
    assert "logits moved by" in msg and "n/a" not in msg
    drift = _rel(_logits(requantized, ids), exact)
    print(f"re-quantized merge: logits rel drift {drift:.4f} on this batch; log: {msg}")
    assert 1e-3 < drift < 0.5  # re-quantizing is lossy — the reason dequantize=True is the default


# -- peft interop ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_adapter_loads_in_peft_on_a_bitsandbytes_quantized_base(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    tiny_llama64().save_pretrained(tmp_path / "base")
    ours = peftlab.apply(tiny_llama64(), QLoRAConfig(r=4, use_dora=use_dora))
    _perturb(ours)
    peftlab.save_adapter(ours, tmp_path / "adapter")
    base = _load_4bit(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    for m in theirs.modules():  # bitsandbytes' CPU inference repacking would rewrite the codes
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    a = dict(_quantized_layers(ours))
    b = {n.removeprefix("base_model.model."): m for n, m in _quantized_layers(theirs).items()}
    assert len(a) == 14
    for n, m in a.items():  # transformers quantized the same weights to the same codes
        assert torch.equal(m.weight.data, b[n].weight.data), n
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)

    # And peftlab adopts the bitsandbytes-loaded base as it is (no second quantization).
    loaded = _load_4bit(tmp_path / "base")
    peftlab.load_adapter(loaded, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
    plain = peftlab.merge_and_unload(loaded)
    assert _rel(_logits(plain, ids), _logits(ours, ids)) < 1e-4


def test_combined_qlora_adapter_loads_in_peft(tmp_path):
    """Two QLoRA adapters combined (cat, weights 0.5 and 1.5) load in peft on a
    bitsandbytes-quantized base with the logits of the combination in peftlab."""
    peft = pytest.importorskip("peft")
    tiny_llama64().save_pretrained(tmp_path / "base")
    ours = tiny_llama64()
    for name, r in (("a", 4), ("b", 2)):
        peftlab.apply(ours, QLoRAConfig(r=r, alpha=2 * r), name)  # all linear: as bnb quantizes
    peftlab.set_adapter(ours, ["a", "b"])  # both train: both are perturbed
    _perturb(ours)
    peftlab.combine(ours, {"a": 0.5, "b": 1.5}, "cat", new_name="ab")
    peftlab.save_adapter(ours, tmp_path / "ab", adapter_name="ab")
    theirs = peft.PeftModel.from_pretrained(_load_4bit(tmp_path / "base"), tmp_path / "ab").eval()
    for m in theirs.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    peftlab.set_adapter(ours, "ab")
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-5, atol=1e-5)
    peftlab.set_adapter(ours, "a")
    assert _rel(_logits(ours, ids), _logits(theirs, ids)) > 1e-3  # the comparison can fail


# -- optimizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizer_without_cuda_warns_and_uses_adamw(name):
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.warns(UserWarning, match=f"optimizer='{name}' .* needs CUDA.*torch.optim.AdamW"):
        opt = make_optimizer([p], name, lr=1e-3)
    assert type(opt) is torch.optim.AdamW


def test_adamw_8bit_runs_on_cpu_and_param_groups_keep_their_decay():
    p, v = nn.Parameter(torch.randn(64, 128)), nn.Parameter(torch.randn(64))
    opt = make_optimizer(
        [{"params": [p], "weight_decay": 0.1}, {"params": [v], "weight_decay": 0.0}],
        "adamw_8bit",
        lr=1e-3,
        weight_decay=0.5,
    )
    assert type(opt).__name__ == "AdamW8bit"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = p.detach().clone()
    p.grad, v.grad = torch.randn_like(p), torch.randn_like(v)
    opt.step()
    assert not torch.equal(p, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need CUDA")
def test_paged_optimizers_on_cuda():
    p = nn.Parameter(torch.randn(256, 256, device="cuda"))
    for name, cls in [
        ("paged_adamw_32bit", "PagedAdamW32bit"),
        ("paged_adamw_8bit", "PagedAdamW8bit"),
    ]:
        opt = make_optimizer([p], name, lr=1e-3)
        assert type(opt).__name__ == cls
        p.grad = torch.randn_like(p)
        opt.step()


def test_unknown_optimizer_and_no_parameters_are_errors():
    with pytest.raises(ConfigError, match="optimizer='sgd' is invalid"):
        make_optimizer([nn.Parameter(torch.zeros(1))], "sgd")
    with pytest.raises(ConfigError, match="no parameters"):
        make_optimizer([], "adamw")


# -- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_nf4_storage_error_loss_gap_and_exact_merge():
    """SmolLM2-135M: every all-linear layer 4-bit, bits/param with and without double quant,
    NF4 weight error, loss gap to the float model, exact dequantized merge."""
    from peftlab.core.matching import find_targets
    from peftlab.models import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    text = [
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        "Water boils at one hundred degrees Celsius at sea level on the Earth.",
    ]
    batch = tok(text, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        float_loss = model(**batch, labels=labels).loss.item()
    names = find_targets(model, "all-linear")
    original = {n: model.get_submodule(n).weight for n in names}

    peftlab.apply(model, QLoRAConfig(r=8))
    assert len(_quantized_layers(model)) == len(names) == 30 * 7
    mem = quantized_memory(model)
    # Without double quantization, measured on one block's seven layers (every shape there is).
    block = nn.ModuleList()
    for n in names[:7]:
        dense = nn.Linear(*original[n].shape[::-1], bias=False, device="meta")
        dense.weight = original[n]
        block.append(quantize_linear(dense, double_quant=False))
    mem_plain = quantized_memory(block)
    errors = [
        _rel(dense_weight(model.get_submodule(n).base_layer).float(), w.detach())
        for n, w in original.items()
    ]
    nf4_error = sum(errors) / len(errors)
    with torch.no_grad():
        qlora_loss = model(**batch, labels=labels).loss.item()
    print(
        f"SmolLM2 NF4+DQ: {mem}; without DQ: {mem_plain['bits_per_param']:.4f} bits; mean "
        f"relative weight error {nf4_error:.4f} (max {max(errors):.4f}); loss float "
        f"{float_loss:.4f} vs QLoRA {qlora_loss:.4f} (gap {qlora_loss - float_loss:+.4f})"
    )
    assert 4.12 < mem["bits_per_param"] <= 4.2
    assert mem_plain["bits_per_param"] == pytest.approx(4.5)
    assert mem["quantized_params"] == sum(w.numel() for w in original.values())
    assert 0.05 < nf4_error < 0.12
    assert abs(qlora_loss - float_loss) < 0.6

    _perturb(model, scale=0.01)
    with torch.no_grad():
        out = model(**batch).logits
    plain = peftlab.merge_and_unload(model)
    with torch.no_grad():
        merged = plain(**batch).logits
    rel = _rel(merged, out)
    print(f"SmolLM2 merge_and_unload(dequantize=True) vs unmerged QLoRA: logits rel {rel:.2e}")
    assert not _quantized_layers(plain) and rel < 1e-4


def test_layer_repacked_by_bitsandbytes_cpu_inference_is_refused():
    model = peftlab.unload(
        peftlab.apply(tiny_llama(), QLoRAConfig(r=4))
    )  # 4-bit layers, no adapter
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's eval path leaves behind
    with pytest.raises(
        ConfigError, match="q_proj was repacked .* apply the adapter right after loading"
    ):
        peftlab.apply(model, QLoRAConfig(r=4))


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_bitsandbytes_loaded_base_with_rows_off_the_blocksize_computes_correctly(tmp_path, method):
    """transformers' BitsAndBytesConfig gives bitsandbytes' own Linear4bit, whose CPU kernel
    misreads rows that are not a multiple of the blocksize (here 32 of 64). Any low-rank
    adapter applied on it adopts the layer as peftlab's Linear4bit: outputs then equal the
    dense model with the dequantized weights."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = _load_4bit(tmp_path / "base")
    layers = _quantized_layers(model)
    assert any(m.weight.quant_state.shape[-1] % 64 for m in layers.values())
    reference = copy.deepcopy(model)  # the same codes, dequantized correctly into dense layers
    for name, layer in _quantized_layers(reference).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
        dense.weight = nn.Parameter(dense_weight(layer), requires_grad=False)
        reference.set_submodule(name, dense)
    peftlab.apply(model, peftlab.config_from_dict({"method": method, "r": 4}))
    assert all(type(m) is Linear4bit for m in _quantized_layers(model).values())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        _logits(model.eval(), ids), _logits(reference.eval(), ids), rtol=1e-5, atol=1e-5
    )
