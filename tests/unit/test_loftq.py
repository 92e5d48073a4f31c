"""LoftQ initialization of QLoRA (``init: loftq``): the adapter starts at the best rank-r
correction of each layer's 4-bit error (Eckart–Young), the model moves closer to the float
one, and the adapter is an ordinary QLoRA adapter (saved, reloaded, read by peft)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.weights import dense_weight
from peftlab.methods._loftq import quantization_error
from peftlab.methods.qlora import QLoRAConfig

bnb = pytest.importorskip("bitsandbytes")
from tests.unit.test_qlora import _load_4bit, _logits, _rel, tiny_llama64  # noqa: E402

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))


def _float_weights(model):
    return {n: dense_weight(m).detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}  # fmt: skip


@pytest.mark.parametrize("r,alpha", [(4, 8), (8, 8)])
def test_each_layer_starts_at_the_optimal_rank_r_correction(r, alpha):
    original = _float_weights(tiny_llama64())
    model = peftlab.apply(tiny_llama64(), QLoRAConfig(r=r, alpha=alpha, init="loftq"))
    for name, w in original.items():
        layer = model.get_submodule(name)
        plain = quantization_error(layer, w, None)
        loftq = quantization_error(layer, w, "default")
        S = torch.linalg.svdvals(w.float() - dense_weight(layer.base_layer).float())
        optimum = float(S[r:].square().sum().sqrt() / w.float().norm())  # Eckart–Young
        assert loftq == pytest.approx(optimum, rel=1e-4), name
        assert loftq < plain, name


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_the_model_starts_closer_to_the_float_model(use_dora):
    want = _logits(tiny_llama64(), IDS)
    plain = peftlab.apply(tiny_llama64(), QLoRAConfig(r=8, use_dora=use_dora))
    loftq = peftlab.apply(tiny_llama64(), QLoRAConfig(r=8, use_dora=use_dora, init="loftq"))
    err_plain, err_loftq = _rel(_logits(plain, IDS), want), _rel(_logits(loftq, IDS), want)
    print(f"logit error vs float: plain {err_plain:.4f}, loftq {err_loftq:.4f}")
    assert err_loftq < 0.9 * err_plain
    if use_dora:  # the magnitude is the row norm of the corrected weight: output = (Q + sBA)·x
        layer = loftq.model.layers[0].self_attn.q_proj
        w = dense_weight(layer.base_layer).float() + layer.delta_weight("default").float()
        x = torch.randn(3, 64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-4, atol=1e-5)


def test_saved_as_a_plain_qlora_adapter_that_loads_here_and_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_llama64().save_pretrained(tmp_path / "base")
    ours = peftlab.apply(tiny_llama64(), QLoRAConfig(r=4, init="loftq"))
    peftlab.save_adapter(ours, tmp_path / "adapter")
    doc = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"init_lora_weights": true' in doc and "loftq" not in doc
    mine = peftlab.load_adapter(_load_4bit(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(mine, IDS), _logits(ours, IDS), rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(_load_4bit(tmp_path / "base"), tmp_path / "adapter")
    for m in theirs.modules():  # bitsandbytes' CPU inference repacking would rewrite the codes
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(
        _logits(theirs.eval(), IDS), _logits(ours, IDS), rtol=1e-5, atol=1e-5
    )


def test_refusals_leave_the_model_as_it_was(tmp_path):
    tiny_llama64().save_pretrained(tmp_path / "base")
    loaded = _load_4bit(tmp_path / "base")
    before = _logits(loaded, IDS)
    with pytest.raises(ConfigError, match="init='loftq' needs the 16/32-bit weights"):
        peftlab.apply(loaded, QLoRAConfig(r=4, init="loftq"))
    torch.testing.assert_close(_logits(loaded, IDS), before, rtol=0, atol=0)
    model = peftlab.apply(tiny_llama64(), QLoRAConfig(r=4))
    with pytest.raises(ConfigError, match="already 4-bit"):
        peftlab.apply(model, QLoRAConfig(r=4, init="loftq"), adapter_name="second")
    with pytest.raises(ConfigError, match="init='loftq' is invalid"):
        peftlab.LoRAConfig(r=4, init="loftq")


def test_error_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import loftq_error

    fig = tmp_path / "loftq.png"
    assert loftq_error.main(["--model", "tiny", "--ranks", "4", "--figure", str(fig)]) == 0
    out = capsys.readouterr().out
    assert "plain QLoRA" in out and "LoftQ r=4" in out and fig.stat().st_size > 0
