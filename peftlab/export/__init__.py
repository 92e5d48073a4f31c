"""``peftlab export``: from a trained adapter to something people deploy, verified.

    import peftlab.export
    report = peftlab.export.export("runs/lora", "gguf", "out/gguf", quant="q8_0")

Formats:

- ``hf``: the merged model (``merge_and_unload``; QLoRA merged into its dequantized 4-bit base,
  exactly what was trained) as a Hugging Face directory: safetensors (sharded above
  ``max_shard_size``), config, generation config, tokenizer and chat template.
- ``gguf``: one llama.cpp file (Llama family) with the tokenizer embedded, in f32, f16, bf16
  or q8_0 (:mod:`peftlab.export.to_gguf`).
- ``peft``: the adapter in peft's layout, for the methods peft can represent
  (:mod:`peftlab.export.to_peft`).

Every export is written into a temporary directory beside ``out``, reloaded the way a user
would load it, checked against base + adapter (:mod:`peftlab.export.checks`: max relative logit
difference, top-1 agreement, greedy-generation agreement, tokenizer agreement) and renamed into
place only if it is within tolerance; ``export_report.json`` in ``out`` holds the figures. A
refusal or a failed check leaves nothing behind.
"""

from peftlab.export.checks import TOLERANCES
from peftlab.export.errors import ExportError, ExportVerificationError
from peftlab.export.exporter import FORMATS, GGUF_QUANTS, HF_DTYPES, REPORT, export, verify

__all__ = [
    "FORMATS",
    "GGUF_QUANTS",
    "HF_DTYPES",
    "REPORT",
    "TOLERANCES",
    "ExportError",
    "ExportVerificationError",
    "export",
    "verify",
]
