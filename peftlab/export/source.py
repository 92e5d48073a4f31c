"""What an export starts from: a run directory, an adapter directory or a compare output, and
the base model the adapter was trained on.

- run directory: ``config.yaml`` (its ``model`` key names the base) and ``adapter/``;
- adapter directory: ``adapter_config.json`` (its ``base_model_name_or_path`` names the base)
  and ``adapter_model.safetensors``;
- compare output: ``plan.json`` and ``runs/<name>/`` run directories; ``run`` picks one.

``model`` (the CLI's ``--model``) overrides the base in every case.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from torch import nn

from peftlab.core.config import MethodConfig
from peftlab.core.io import CONFIG_NAME, read_adapter_config
from peftlab.export.errors import ExportError


@dataclasses.dataclass
class Source:
    """A resolved export source."""

    adapter_dir: Path
    base: str
    """Bundled name, HF directory or .gguf path, as :func:`peftlab.models.load_model` takes it."""
    config: MethodConfig
    run_dir: Path | None = None

    @property
    def method(self) -> str:
        return self.config.method

    def describe(self) -> dict:
        return {
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "adapter_dir": str(self.adapter_dir),
            "base_model": self.base,
            "method": self.method,
            "method_config": self.config.to_dict(),
        }


def resolve(source: str | Path, model: str | None = None, run: str | None = None) -> Source:
    """The adapter and base model ``source`` names.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ExportError: ``source`` is none of the three layouts, or names no base model.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"export source {str(path)!r} does not exist")
    if (path / "plan.json").is_file() and (path / "runs").is_dir():
        path = _compare_run(path, run)
    elif run is not None:
        raise ExportError(f"run={run!r} picks a run of a compare output; {path} is not one")
    if (path / "config.yaml").is_file():
        adapter_dir = path / "adapter"
        if not (adapter_dir / CONFIG_NAME).is_file():
            raise ExportError(
                f"run directory {path} holds no adapter/{CONFIG_NAME}: the run did not finish "
                f"(export its last checkpoint's adapter directory instead)"
            )
        base = model or _run_model(path / "config.yaml")
        return Source(adapter_dir, base, read_adapter_config(adapter_dir), run_dir=path)
    if (path / CONFIG_NAME).is_file():
        config = read_adapter_config(path)  # a corrupt file is refused here, in one line
        doc = json.loads((path / CONFIG_NAME).read_text())
        base = model or doc.get("base_model_name_or_path")
        if not base:
            raise ExportError(
                f"{path / CONFIG_NAME} names no base_model_name_or_path; pass the base model "
                f"(--model NAME_OR_PATH)"
            )
        return Source(path, str(base), config)
    raise ExportError(
        f"{path} is neither a run directory (config.yaml + adapter/), an adapter directory "
        f"({CONFIG_NAME}) nor a compare output (plan.json + runs/)"
    )


def _compare_run(path: Path, run: str | None) -> Path:
    names = sorted(d.name for d in (path / "runs").iterdir() if (d / "config.yaml").is_file())
    if run is None:
        raise ExportError(
            f"{path} is a compare output; pick a run with --run NAME (one of {names})"
        )
    if run not in names:
        raise ExportError(f"run={run!r} is not a run of the compare output {path}; it has {names}")
    return path / "runs" / run


def _run_model(config_file: Path) -> str:
    try:
        doc = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{config_file} is not valid YAML ({e})") from e
    if not doc.get("model"):
        raise ExportError(f"{config_file} names no model; pass the base model (--model)")
    return str(doc["model"])


def source_gguf(base: str) -> Path | None:
    """The GGUF file the base model was read from, if any (its tokenizer metadata is copied
    verbatim into a GGUF export): the bundled SmolLM2, its cache directory, or a .gguf path."""
    from peftlab.models import SMOLLM2, cache_dir, smollm2_gguf

    if base == SMOLLM2:
        return smollm2_gguf()
    path = Path(base).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    cached = cache_dir() / "models" / SMOLLM2
    if path.is_dir() and cached.is_dir() and path.resolve() == cached.resolve():
        return smollm2_gguf()
    return None


def model_config(base: str):
    """The transformers config of the base model (no weights loaded)."""
    from transformers import AutoConfig

    from peftlab.models import resolve as resolve_model

    directory, gguf = resolve_model(base)
    if gguf:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf)
    return AutoConfig.from_pretrained(directory)


def load_tokenizer(base: str):
    """The base model's tokenizer, exactly as its directory (or GGUF) defines it."""
    from transformers import AutoTokenizer

    from peftlab.models import resolve as resolve_model

    directory, gguf = resolve_model(base)
    return AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))


def _base(src: Source) -> nn.Module:
    from peftlab.models import load_model

    return load_model(src.base, "causal-lm", dtype=torch.float32).eval()


def load_reference(src: Source) -> nn.Module:
    """Base + adapter as trained: adapter layers in place (QLoRA: on its 4-bit base), float32."""
    import peftlab

    return peftlab.load_adapter(_base(src), src.adapter_dir).eval()


def load_merged(src: Source) -> nn.Module:
    """A plain model with the adapter merged (QLoRA: into the dequantized 4-bit base, which is
    what the adapter was trained against, so the merge is exact)."""
    import peftlab

    model = peftlab.load_adapter(_base(src), src.adapter_dir)
    model = peftlab.merge_and_unload(model, dequantize=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def load_float_base(src: Source) -> nn.Module:
    """QLoRA's trained adapters on the original float base instead of its 4-bit rounding:
    what merging into the float weights would compute (the drift the report states)."""
    from safetensors.torch import load_file

    import peftlab
    from peftlab.core.io import WEIGHTS_NAME, adapter_state_dict

    model = peftlab.apply(_base(src), src.config.adapter_config())
    stored = load_file(src.adapter_dir / WEIGHTS_NAME)
    for key, t in adapter_state_dict(model).items():
        t.copy_(stored[key])
    return model.eval()
