"""The adapter in peft's layout, for the methods peft can represent.

LoRA, DoRA, QLoRA and IA³ adapters are already written in peft's layout by
:func:`peftlab.save_adapter` (``adapter_config.json`` with ``peft_type: LORA`` and
``base_model.model.<module>.lora_A.weight`` keys, or ``IA3`` and ``….ia3_l``); a method registers that it can be read by
peft through its ``peft_export`` hook. Every other method is refused with the reason peft
cannot hold it, so no file appears that peft would misread.

Servers that read peft adapters refuse some of what peft itself accepts; those are warnings
naming the key and the server, not refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from peftlab.core.config import MethodConfig
from peftlab.core.registry import get_method
from peftlab.export.errors import ExportError

# Why peft cannot read an adapter of these methods (data, not dispatch: the test for whether
# a method is representable is its registered ``peft_export`` hook).
WHY_NOT = {
    "adapter": "peft has no bottleneck-adapter type (Houlsby/Pfeiffer down-act-up with a skip)",
    "prefix": "peftlab stores the folded per-layer key/value prefix table, which peft's "
    "PREFIX_TUNING (an embedding re-projected at load) does not read",
    "ptuning-v2": "its deep prompts are peftlab's folded per-layer key/value table, which peft's "
    "P_TUNING/PREFIX_TUNING do not read",
    "prompt": "peftlab's soft prompt and peft's PROMPT_TUNING differ in layout",
    "full": "full fine-tuning has no adapter; export --format hf for the fine-tuned model",
}


def check_representable(config: MethodConfig) -> None:
    spec = get_method(config.method)
    if spec.peft_export is None:
        why = WHY_NOT.get(config.method, "peftlab writes it in its own layout only")
        raise ExportError(
            f"--format peft cannot represent method {config.method!r}: {why}; keep the peftlab "
            f"adapter directory (peftlab.load_adapter)"
            + (", or export --format hf if the method is mergeable" if config.mergeable else "")
        )


def server_warnings(config: MethodConfig) -> list[str]:
    """What common servers refuse in the peft adapter of this config (read from the fields the
    method writes for peft)."""
    doc = get_method(config.method).peft_export(config)
    out = []
    if doc.get("modules_to_save"):
        out.append(
            f"modules_to_save={doc['modules_to_save']!r}: vLLM's LoRA loader refuses adapters "
            f"with modules_to_save (serve the merged model: --format hf)"
        )
    if doc.get("use_dora"):
        out.append("use_dora=true: vLLM serves LoRA adapters only, not DoRA (use --format hf)")
    if getattr(config, "quant_type", None):
        out.append(
            "QLoRA: peft applies this adapter to whatever base it is given; the logits it was "
            "trained with need the base in 4-bit (BitsAndBytesConfig(load_in_4bit=True, "
            f"bnb_4bit_quant_type={config.quant_type!r}, "
            f"bnb_4bit_use_double_quant={config.double_quant})) — or export --format hf"
        )
    return out


def write_peft(model: nn.Module, out: Path, base_name: str) -> dict:
    """Write the adapter on ``model`` (as loaded from the source) to ``out``.

    ``modules_to_save`` entries are written as qualified module names: peft matches them as
    plain suffixes (``"norm"`` would also take every ``input_layernorm``), peftlab at a dot.
    """
    import peftlab
    from peftlab.core.fileio import atomic_write_json
    from peftlab.core.io import CONFIG_NAME
    from peftlab.core.state import active_adapter, saved_modules

    peftlab.save_adapter(model, out, base_model_name_or_path=base_name)
    doc = json.loads((out / CONFIG_NAME).read_text())
    if doc.get("modules_to_save"):
        doc["modules_to_save"] = list(saved_modules(model, active_adapter(model)))
        atomic_write_json(out / CONFIG_NAME, doc)
    return {"files": sorted(p.name for p in out.iterdir())}


def load_with_peft(base: nn.Module, out: Path) -> nn.Module | None:
    """The adapter loaded by ``peft.PeftModel`` (None when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel.from_pretrained(base, str(out)).eval()
