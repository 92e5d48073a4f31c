"""peftlab export: merged HF, GGUF and peft exports of a tiny Llama, verified; refusals leave
nothing behind; the CLI's bad arguments are one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import peftlab
from peftlab.export import ExportError, ExportVerificationError, export, verify
from peftlab.export.to_gguf import permute_qk

gguf = pytest.importorskip("gguf")

PROMPTS = ["hello world", "the quick brown fox", "sort 3 1 2", "how are you?"]
FAST = {"prompts": PROMPTS, "new_tokens": 4}
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def bpe_tokenizer():
    """A byte-level BPE tokenizer (SmolLM2's kind), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you?"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT
    return fast


# Other GGUF families: (config class, model class, fields beyond the Llama ones).
GGUF_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # q/k/v biases
    # q/k norms; transformers' GGUF loader assumes head_dim 128 (all Qwen3 dense models)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 128}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
}


def save_base(path: Path, arch: str = "llama") -> Path:
    """A 2-layer model (vocab padded past the tokenizer's, as real models do) + tokenizer."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    if arch in GGUF_FAMILIES:
        config_class, model_class, extra = GGUF_FAMILIES[arch]
        cfg = getattr(transformers, config_class)(
            vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, **extra,
        )  # fmt: skip
        model = getattr(transformers, model_class)(cfg)
        with torch.no_grad():  # biases that matter (zero at init)
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok) + 4,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.1,  # peaked logits, so top-1 is meaningful
            tie_word_embeddings=True,  # as SmolLM2
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(cfg)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_run(root: Path, base: Path, config: peftlab.MethodConfig, name: str) -> Path:
    """A run directory as ``peftlab train`` leaves it: config.yaml + adapter/ (trained
    weights stood in for by a seeded perturbation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peftlab.apply(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    run = root / name
    run.mkdir()
    doc = {"model": str(base), "method": config.method, "method_args": config.to_dict()}
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    peftlab.save_adapter(model, run / "adapter")
    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def base(root):
    return save_base(root / "base")


@pytest.fixture(scope="module")
def lora_run(root, base):
    return make_run(
        root, base, peftlab.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "lora"
    )


def _reference(base: Path, adapter: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peftlab.load_adapter(model, adapter).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---- hf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_hf_export_reloads_and_matches_base_plus_adapter(root, base, method, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        config = peftlab.QLoRAConfig(r=4, alpha=8)
    elif method == "dora":
        config = peftlab.DoRAConfig(r=4, alpha=8, target_modules="all-linear")
    else:
        config = peftlab.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    run = make_run(root, base, config, f"hf-{method}")
    out = tmp_path / "hf"
    report = export(run, "hf", out, **FAST)

    (check,) = report["checks"]
    assert report["passed"] and check["passed"] and check["judged"]
    assert check["max_rel_logit_diff"] < 1e-4 and check["top1_agreement"] == 1.0
    assert check["tokenizer_agreement"] == 1.0 and check["chat_template_kept"]
    assert json.loads((out / "export_report.json").read_text())["checks"] == report["checks"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (out / name).is_file(), name
    # Independently of the report: a user's reload computes what base + adapter compute.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT
    ids = torch.tensor([[5, 60, 7, 100, 33, 2]])
    reference = _reference(base, run / "adapter")
    assert _rel(_logits(model, ids), _logits(reference, ids)) < 1e-5
    if method == "qlora":
        assert report["qlora"]["requantized"] is False
        # The float-base drift is stated: the 4-bit rounding the adapter was trained against.
        assert report["qlora_float_base_drift"]["max_rel_logit_diff"] > 1e-3


def test_hf_export_shards_and_casts(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf16"
    export(lora_run, "hf", out, dtype="bf16", max_shard_size="40KB", verify=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "export_report.json").read_text())["verified"] is False


# ---- gguf --------------------------------------------------------------------------------


def _gguf_file(out: Path) -> Path:
    (path,) = out.glob("*.gguf")
    return path


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def test_gguf_f32_reloads_through_transformers_with_matching_logits(lora_run, base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gguf32"
    report = export(lora_run, "gguf", out, quant="f32", **FAST)
    (check,) = report["checks"]
    assert check["passed"] and check["max_rel_logit_diff"] < 1e-4
    assert check["top1_agreement"] == 1.0 and check["greedy_identical"] == 1.0
    assert check["tokenizer_agreement"] == 1.0 and check["chat_template_kept"]
    path = _gguf_file(out)
    assert (out / "Modelfile").read_text() == f"FROM ./{path.name}\n"
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[5, 60, 7, 100, 33, 2]])
    assert (
        _rel(_logits(model.eval(), ids), _logits(_reference(base, lora_run / "adapter"), ids))
        < 1e-5
    )


@pytest.mark.parametrize("arch", sorted(GGUF_FAMILIES))
def test_gguf_other_families_reload_with_matching_logits(arch, root, tmp_path):
    """Qwen2 (q/k/v biases, tied head, no Q/K permutation), Qwen3 (q/k norms) and Mistral
    (written as llama.cpp writes it: the llama architecture, sliding window dropped and said)."""
    from transformers import AutoModelForCausalLM

    base = save_base(root / f"{arch}-base", arch=arch)
    run = make_run(root, base, peftlab.LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                   f"{arch}-lora")  # fmt: skip
    out = tmp_path / arch
    report = export(run, "gguf", out, quant="f32", **FAST)
    (check,) = report["checks"]
    assert check["passed"] and check["max_rel_logit_diff"] < 1e-4 and check["top1_agreement"] == 1
    path = _gguf_file(out)
    reader = gguf.GGUFReader(path)
    expected = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}[arch]
    assert _field(reader, "general.architecture") == expected
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
    assert any("sliding_window=128" in w for w in report["warnings"]) == (arch == "mistral")
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[5, 60, 7, 100, 33, 2]])
    reference = _logits(_reference(base, run / "adapter"), ids)
    assert _rel(_logits(model.eval(), ids), reference) < 1e-5


def test_gguf_tensors_and_tokenizer_metadata_read_back(lora_run, base, tmp_path):
    """Names, shapes and types as llama.cpp's converter writes them; Q/K permuted the way
    transformers' loader undoes; the tokenizer (tokens, types, merges, ids, template) intact."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    out = tmp_path / "gguf-meta"
    export(lora_run, "gguf", out, quant="f32", verify=False)
    reader = gguf.GGUFReader(_gguf_file(out))
    cfg = AutoConfig.from_pretrained(base)
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight"
        for i in range(cfg.num_hidden_layers)
        for n in (
            [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ]
        )
    }
    assert set(tensors) == expected  # tied head: no output.weight
    assert tuple(tensors["blk.0.attn_k.weight"].data.shape) == (32, 64)
    assert tuple(tensors["blk.1.ffn_down.weight"].data.shape) == (64, 128)
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}

    merged = peftlab.merge_and_unload(_reference(base, lora_run / "adapter"))
    q = merged.model.layers[0].self_attn.q_proj.weight.detach()
    k = merged.model.layers[0].self_attn.k_proj.weight.detach()
    stored_q = np.array(tensors["blk.0.attn_q.weight"].data)
    stored_k = np.array(tensors["blk.0.attn_k.weight"].data)
    assert np.array_equal(stored_q, permute_qk(q, 4).numpy())
    assert not np.array_equal(stored_q, q.numpy())
    undo = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(undo.process(stored_q, "blk.0.attn_q.weight").weights, q.numpy())
    assert np.array_equal(undo.process(stored_k, "blk.0.attn_k.weight").weights, k.numpy())

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.vocab_size") == cfg.vocab_size
    tok = AutoTokenizer.from_pretrained(base)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads((base / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(reader, "tokenizer.chat_template") == CHAT


def test_gguf_q8_0_is_quantized_and_agrees_on_top1(lora_run, tmp_path):
    out = tmp_path / "gguf8"
    report = export(lora_run, "gguf", out, quant="q8_0", **FAST)
    (check,) = report["checks"]
    assert check["passed"] and check["top1_agreement"] >= 0.9
    assert 0 < check["max_rel_logit_diff"] < 0.2
    reader = gguf.GGUFReader(_gguf_file(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_gguf_refuses_other_architectures_naming_llama(root, tmp_path):
    gpt2 = save_base(root / "gpt2-base", arch="gpt2")
    run = make_run(root, gpt2, peftlab.LoRAConfig(r=2, target_modules="all-linear"), "gpt2-lora")
    out = tmp_path / "g"
    with pytest.raises(ExportError, match=r"supports the Llama .* model_type 'gpt2'"):
        export(run, "gguf", out)
    assert not out.exists() and not _leftovers(out)


def test_gguf_refuses_a_tokenizer_it_cannot_embed(root, tmp_path):
    from tests.tiny_lm import save_tiny_lm

    char_base = save_tiny_lm(root / "char-base")  # word-level, one token per character
    run = make_run(root, char_base, peftlab.LoRAConfig(r=2, target_modules="all-linear"), "char")
    out = tmp_path / "g"
    with pytest.raises(ExportError, match="byte-level BPE"):
        export(run, "gguf", out, quant="f32")
    assert not out.exists() and not _leftovers(out)


def test_gguf_pre_tokenizer_is_named_as_llama_cpp_names_it_or_refused():
    from peftlab.export.gguf_vocab import _LLAMA3_SPLIT, pre_tokenizer_name

    def doc(*steps):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}

    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(doc(digits, byte_level)) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}}
    assert pre_tokenizer_name(doc(split, {"type": "ByteLevel", "use_regex": False})) == "llama-bpe"
    other = {"type": "Split", "pattern": {"Regex": r"\w+"}}
    with pytest.raises(ExportError, match=r"pre-tokenizer \['Split', 'ByteLevel'\] is not one"):
        pre_tokenizer_name(doc(other, byte_level))


# ---- peft --------------------------------------------------------------------------------


def test_peft_export_is_verified_with_peftlab_and_peft(root, base, tmp_path):
    config = peftlab.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    run = make_run(root, base, config, "peft-lora")
    out = tmp_path / "peft"
    report = export(run, "peft", out, **FAST)
    names = [c["check"] for c in report["checks"]]
    assert names[0] == "peftlab.load_adapter" and report["checks"][0]["max_rel_logit_diff"] == 0
    if _has_peft():
        assert names == ["peftlab.load_adapter", "peft.PeftModel"]
        assert report["checks"][1]["max_rel_logit_diff"] < 1e-5
    assert any("modules_to_save" in w and "vLLM" in w for w in report["warnings"])
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["peft_type"] == "LORA" and doc["base_model_name_or_path"] == str(base)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (peftlab.AdapterConfig(bottleneck=8), "bottleneck"),
        (peftlab.PrefixTuningConfig(num_virtual_tokens=4, reparam_hidden=16), "prefix table"),
    ],
    ids=["adapter", "prefix"],
)
def test_peft_refuses_what_peft_cannot_represent(root, base, config, why, tmp_path):
    run = make_run(root, base, config, f"refuse-{config.method}")
    out = tmp_path / "p"
    with pytest.raises(ExportError, match=f"cannot represent method '{config.method}'.*{why}"):
        export(run, "peft", out)
    assert not out.exists() and not _leftovers(out)
    with pytest.raises(ExportError, match="cannot be merged"):
        export(run, "hf", out)
    assert not out.exists() and not _leftovers(out)


# ---- verification, output directory, sources -------------------------------------------


def test_a_corrupted_export_fails_verification(lora_run, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "hf"
    export(lora_run, "hf", out, verify=False)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.self_attn.v_proj.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportVerificationError, match="max relative logit difference") as e:
        verify(out, **FAST)
    assert e.value.report["passed"] is False


def test_out_of_tolerance_is_an_error_and_keeps_nothing(lora_run, tmp_path, monkeypatch):
    from peftlab.export import checks

    monkeypatch.setitem(checks.TOLERANCES, "f32", checks.Tolerance(-1.0, 1.0))
    out = tmp_path / "hf"
    with pytest.raises(ExportVerificationError, match=r"hf|AutoModel"):
        export(lora_run, "hf", out, **FAST)
    assert not out.exists() and not _leftovers(out)


def test_an_existing_output_directory_is_kept_unless_overwrite(lora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        export(lora_run, "peft", out, verify=False)
    assert (out / "precious.txt").read_text() == "keep me" and not _leftovers(out)
    export(lora_run, "peft", out, verify=False, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "adapter_config.json").is_file()


def test_sources_adapter_dir_and_compare_output(root, lora_run, tmp_path):
    report = export(lora_run / "adapter", "peft", tmp_path / "a", verify=False)
    assert report["source"]["run_dir"] is None
    compare = root / "compare"
    (compare / "runs").mkdir(parents=True)
    (compare / "plan.json").write_text("{}")
    os.symlink(lora_run, compare / "runs" / "lora")
    with pytest.raises(ExportError, match=r"--run NAME \(one of \['lora'\]\)"):
        export(compare, "peft", tmp_path / "b")
    with pytest.raises(ExportError, match="'dora' is not a run"):
        export(compare, "peft", tmp_path / "b", run="dora")
    report = export(compare, "peft", tmp_path / "b", run="lora", verify=False)
    assert report["source"]["run_dir"].endswith("runs/lora")


# ---- CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx"], "format='onnx' is not an export format"),
        (["--format", "hf", "--quant", "q8_0"], "quant='q8_0' applies to --format gguf"),
        (["--format", "gguf", "--quant", "q2_k"], "quant='q2_k' is not supported"),
        (["--format", "gguf", "--dtype", "f32", "--quant", "f16"], "disagree"),
        (["--format", "hf", "--dtype", "f64"], "dtype='f64' is not supported"),
        (["--format", "peft", "--dtype", "f16"], "--dtype and --quant do not apply"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(lora_run, tmp_path, capsys, args, message):
    from peftlab.cli import main

    out = tmp_path / "o"
    assert main(["export", str(lora_run), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("peftlab export: error")
    assert not out.exists()


def test_cli_bad_sources_are_one_line_errors(base, tmp_path, capsys):
    from peftlab.cli import main

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{not json")
    for source, message in [
        (tmp_path / "missing", "does not exist"),
        (base, "neither a run directory"),
        (corrupt, "is not valid JSON"),
    ]:
        assert main(["export", str(source), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_cli_exports_a_run(lora_run, tmp_path, capsys):
    from peftlab.cli import main

    out = tmp_path / "cli"
    argv = ["export", str(lora_run), "--format", "gguf", "--quant", "f32", "--out", str(out)]
    assert main([*argv, "--prompt", "hello world", "--prompt", "the quick brown fox"]) == 0
    printed = capsys.readouterr().out
    assert "verified (transformers GGUF loader)" in printed and "top-1 100.0%" in printed
    assert json.loads((out / "export_report.json").read_text())["checks"][0]["prompts"] == 2
