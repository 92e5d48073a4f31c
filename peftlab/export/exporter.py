"""``export`` and ``verify``: write a format into a temporary directory beside ``out``, reload
it the way a user would, check it against base + adapter, and only then rename it into place."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from peftlab.core.fileio import atomic_write_json, replace_dir
from peftlab.export import checks, to_gguf, to_hf, to_peft
from peftlab.export import source as sources
from peftlab.export.errors import ExportError

FORMATS = ("hf", "gguf", "peft")
HF_DTYPES = tuple(to_hf.DTYPES)
GGUF_QUANTS = tuple(to_gguf.QUANTS)
REPORT = "export_report.json"
DEFAULT_GGUF_QUANT = "f16"


def precision_for(format: str, dtype: str | None, quant: str | None) -> str:
    """The precision the export is written (and judged) in; refuses combinations that mean
    nothing for ``format``."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not an export format; choose one of {FORMATS}")
    if dtype is not None and dtype not in HF_DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose one of {HF_DTYPES}")
    if format == "hf":
        if quant is not None:
            raise ExportError(
                f"quant={quant!r} applies to --format gguf; an hf export is dense (merged "
                f"exactly, QLoRA into its dequantized base) — choose --dtype {'|'.join(HF_DTYPES)}"
            )
        return dtype or "f32"
    if format == "gguf":
        if quant is not None and quant not in GGUF_QUANTS:
            raise ExportError(
                f"quant={quant!r} is not supported for gguf; choose one of {GGUF_QUANTS}"
            )
        if dtype is not None and quant is not None and dtype != quant:
            raise ExportError(
                f"dtype={dtype!r} and quant={quant!r} disagree; for gguf give --quant only"
            )
        return quant or dtype or DEFAULT_GGUF_QUANT
    if dtype is not None or quant is not None:
        raise ExportError(
            "--format peft writes the adapter as trained; --dtype and --quant do not apply"
        )
    return "f32"


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())[:6]
        raise FileExistsError(
            f"output directory {out} is not empty (holds {held}); pass --overwrite to replace "
            f"it or choose another --out"
        )


def refuse_early(src: sources.Source, format: str) -> None:
    """Refusals that need no weights: say no before anything is loaded or written."""
    from peftlab.models import model_kind

    if format == "peft":
        to_peft.check_representable(src.config)
    elif not src.config.mergeable:
        alt = "; --format peft writes the adapter for peft" if _peft_can_read(src) else ""
        raise ExportError(
            f"--format {format} needs the adapter merged into the base weights, and method "
            f"{src.method!r} cannot be merged (its computation is not a weight delta){alt}"
        )
    kind = model_kind(src.base)
    if kind != "causal-lm":
        raise ExportError(
            f"export supports causal language models; base model {src.base!r} is a {kind} model"
        )
    if format == "gguf":
        to_gguf.check_architecture(sources.model_config(src.base))


def _peft_can_read(src: sources.Source) -> bool:
    try:
        to_peft.check_representable(src.config)
    except ExportError:
        return False
    return True


def export(
    source: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    dtype: str | None = None,
    quant: str | None = None,
    verify: bool = True,
    prompts: list[str] | None = None,
    *,
    model: str | None = None,
    run: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    new_tokens: int = 16,
) -> dict:
    """Export a trained adapter (run dir, adapter dir or compare output) to ``format``.

    Args:
        source: run directory, adapter directory, or compare output (with ``run``).
        format: "hf" (merged model), "gguf" (one llama.cpp file) or "peft" (the adapter).
        out: directory to create; an existing non-empty one only with ``overwrite``.
        dtype: hf weights "f32" (default), "bf16" or "f16".
        quant: gguf tensor type "f16" (default), "f32", "bf16" or "q8_0".
        verify: reload the export and check it against base + adapter (see
            :mod:`peftlab.export.checks`); outside tolerance is an error.
        prompts: verification prompts (default: 16 built-in ones).
        model: the base model, overriding the one the source names.
        run: the run of a compare output to export.
        overwrite: replace a non-empty ``out``.
        max_shard_size: hf safetensors shard size (``save_pretrained``'s ``max_shard_size``).
        new_tokens: greedy tokens generated per prompt for the generation check.

    Returns:
        The report written to ``out/export_report.json``.

    Raises:
        ExportError: a refused argument, source, method or architecture (nothing is written).
        ExportVerificationError: the export is outside tolerance (nothing is kept).
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    precision = precision_for(format, dtype, quant)
    prompts = _prompts(prompts)
    out = Path(out).expanduser()
    check_out(out, overwrite)
    src = sources.resolve(source, model, run)
    refuse_early(src, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        report = _build(src, format, precision, tmp, max_shard_size)
        if verify:
            checked = _verify(src, format, precision, tmp, prompts, new_tokens)
            report["warnings"] += checked.pop("verify_warnings")
            report.update(checked)
        report["verified"] = verify
        atomic_write_json(tmp / REPORT, report)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _prompts(prompts: list[str] | None) -> list[str]:
    if prompts is None:
        return list(checks.DEFAULT_PROMPTS)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ExportError(f"prompts={prompts!r} must be a non-empty list of non-empty strings")
    return prompts


def _export_name(src: sources.Source) -> str:
    stem = Path(src.base).name.removesuffix(".gguf") or "model"
    return f"{stem}-{src.method}"


def _build(src: sources.Source, format: str, precision: str, tmp: Path, shard: str) -> dict:
    import peftlab

    report = {
        "peftlab_version": peftlab.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": format,
        "precision": precision,
        "source": src.describe(),
        "warnings": [],
    }
    if format == "peft":
        from peftlab.models import BUNDLED, load_model, resolve

        base_name = str(resolve(src.base)[0]) if src.base in BUNDLED else src.base
        model = peftlab.load_adapter(load_model(src.base, "causal-lm"), src.adapter_dir)
        report["export"] = to_peft.write_peft(model, tmp, base_name)
        report["warnings"] += to_peft.server_warnings(src.config)
        return report
    tokenizer = sources.load_tokenizer(src.base)
    merged = sources.load_merged(src)
    if format == "hf":
        report["export"] = to_hf.write_hf(merged, tokenizer, tmp, precision, shard)
    else:
        name = f"{_export_name(src)}-{precision}"
        report["export"] = to_gguf.write_gguf(
            merged, tokenizer, src.base, tmp / f"{name}.gguf", precision, name
        )
        report["warnings"] += report["export"].pop("warnings")
        (tmp / "Modelfile").write_text(f"FROM ./{name}.gguf\n")  # `ollama create NAME -f Modelfile`
    if getattr(src.config, "quant_type", None):
        report["qlora"] = {
            "merged_into": "the dequantized 4-bit base the adapter was trained against (exact)",
            "requantized": format == "gguf" and precision == "q8_0",
        }
    return report


def _verify(
    src: sources.Source, format: str, precision: str, directory: Path, prompts, new_tokens: int
) -> dict:
    """Reload the export in ``directory`` and check it against base + adapter."""
    tokenizer = sources.load_tokenizer(src.base)
    ids = checks.prompt_ids(tokenizer, prompts)
    reference = sources.load_reference(src)
    warnings: list[str] = []
    if format == "peft":
        results = _verify_peft(src, directory, reference, ids, new_tokens)
    else:
        if format == "hf":
            model, tok = to_hf.load_hf(directory, precision)
            name, tokenizer_judged = "transformers AutoModelForCausalLM", True
        else:
            path = next(directory.glob("*.gguf"))
            model, tok = to_gguf.load_gguf(path)
            name, tokenizer_judged = "transformers GGUF loader", to_gguf.loader_splits_like(path)
        figures = checks.compare(reference, model, ids, new_tokens)
        figures["tokenizer_agreement"] = checks.tokenizer_agreement(tokenizer, tok, prompts)
        figures["chat_template_kept"] = tok.chat_template == tokenizer.chat_template
        if figures["tokenizer_agreement"] < 1 and not tokenizer_judged:
            warnings.append(
                "transformers' GGUF loader splits text differently from this tokenizer's "
                "pre-tokenizer (llama.cpp follows tokenizer.ggml.pre); tokenizer agreement "
                f"{figures['tokenizer_agreement']:.2f} is reported, not judged"
            )
        del model
        results = [checks.judge(name, figures, precision, tokenizer_judged)]
    out = {"checks": results, "passed": True, "verify_warnings": warnings}
    peft_checked = any(not r["judged"] for r in results)  # peft on the float base: same figures
    if getattr(src.config, "quant_type", None) and not peft_checked:
        # What a merge into the original float weights would have computed instead.
        float_base = sources.load_float_base(src)
        out["qlora_float_base_drift"] = checks.compare(reference, float_base, ids, new_tokens)
    return out


def _verify_peft(src, directory: Path, reference, ids, new_tokens: int) -> list[dict]:
    import peftlab
    from peftlab.models import load_model

    reloaded = peftlab.load_adapter(load_model(src.base, "causal-lm"), directory).eval()
    figures = checks.compare(reference, reloaded, ids, new_tokens)
    results = [checks.judge("peftlab.load_adapter", figures, "f32")]
    del reloaded
    with torch.no_grad():
        peft_model = to_peft.load_with_peft(load_model(src.base, "causal-lm"), directory)
    if peft_model is not None:
        figures = checks.compare(reference, peft_model, ids, new_tokens)
        if getattr(src.config, "quant_type", None):
            # peft puts the adapter on the float base it is given: not what was trained, so
            # the figures are the drift a float-base deployment has, reported and not judged.
            results.append(
                {"check": "peft.PeftModel on the float base", **figures, "judged": False}
            )
        else:
            results.append(checks.judge("peft.PeftModel", figures, "f32"))
    return results


def verify(
    out: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    run: str | None = None,
    prompts: list[str] | None = None,
    new_tokens: int = 16,
) -> dict:
    """Check an existing export directory against base + adapter; returns the figures.

    The format, precision and source default to those in ``out/export_report.json``.

    Raises:
        ExportVerificationError: the export is outside tolerance.
    """
    out = Path(out).expanduser()
    report_file = out / REPORT
    if not report_file.is_file():
        raise ExportError(f"{out} holds no {REPORT}; it is not a peftlab export")
    report = json.loads(report_file.read_text())
    src_doc = report["source"]
    if source is None:
        source = src_doc["run_dir"] or src_doc["adapter_dir"]
        model = model or src_doc["base_model"]
    src = sources.resolve(source, model, run)
    return _verify(src, report["format"], report["precision"], out, _prompts(prompts), new_tokens)
