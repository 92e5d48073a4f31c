"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's layout.

Keys are ``base_model.model.<parameter name without the adapter name>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so LoRA/DoRA/QLoRA adapters
load in ``peft.PeftModel.from_pretrained`` and peft's load here. peftlab's own fields live under
the ``"peftlab"`` key, which peft ignores. Only safetensors is read or written; never pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.core.config import ConfigError, MethodConfig, check, config_from_dict
from peftlab.core.fileio import atomic_write_with
from peftlab.core.matching import matches_target
from peftlab.core.model import adding_adapter, attach_adapter, owner_index, set_adapter
from peftlab.core.registry import get_method
from peftlab.core.saved import adapter_module_state
from peftlab.core.state import active_adapter, adapter_configs, saved_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model."""


def file_key(param_name: str, adapter_name: str, prefix: str) -> str | None:
    """peft's key for a parameter of adapter ``adapter_name``; None if not one of its params."""
    if not prefix:
        return KEY_PREFIX + param_name
    i = owner_index(param_name, adapter_name, prefix)
    if i is None:
        return None
    parts = param_name.split(".")
    return KEY_PREFIX + ".".join(parts[:i] + parts[i + 1 :])


def adapter_state_dict(
    model: nn.Module, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in the file (``base_model.model.…``)."""
    adapter_name = adapter_name or active_adapter(model)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(
            f"no adapter named {adapter_name!r} on the model; it has {sorted(configs)}"
        )
    spec = get_method(configs[adapter_name].method)
    out: dict[str, torch.Tensor] = {}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    if spec.export is not None:
        tensors = list(spec.export(model, adapter_name)[1].items())
    for name, t in tensors:
        if not spec.param_prefix and not t.requires_grad:
            continue  # full fine-tuning saves what trains
        key = file_key(name, adapter_name, spec.param_prefix)
        if key is not None and spec.file_key is not None:
            key = spec.file_key(configs[adapter_name], key)
        if key is not None:
            out[key] = t.detach().contiguous()
    for module_name in saved_modules(model, adapter_name):  # the adapter's own copy
        for name, t in adapter_module_state(model, adapter_name, module_name).items():
            out[f"{KEY_PREFIX}{module_name}.{name}"] = t.detach().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    conventional: bool = False,
) -> Path:
    """Write the adapter to ``path``/{adapter_config.json, adapter_model.safetensors}.

    Files are written to a temporary name and renamed, so an interrupted save never leaves a
    half-written adapter. An existing adapter is only replaced with ``overwrite=True``.
    ``conventional``: an adapter whose config offers ``conventional_adapter`` (a PiSSA/OLoRA
    LoRA: the plain rank-2r LoRA that applies to the original base model) as that; others as
    they are.
    """
    path = Path(path)
    adapter_name = adapter_name or active_adapter(model)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError("the model carries no peftlab adapter to save; call peftlab.apply first")
    config = configs[adapter_name]
    spec = get_method(config.method)
    if spec.export is not None:
        config = spec.export(model, adapter_name)[0]
    if not overwrite and ((path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists()):
        raise FileExistsError(
            f"{path} already holds an adapter; pass overwrite=True to replace it or choose "
            f"another directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    plain = getattr(config, "conventional_adapter", None) if conventional else None
    plain = plain(model, adapter_name) if plain is not None else None
    if plain is not None:  # (config, tensors) of the equivalent conventional adapter
        config, tensors = plain
    else:
        tensors = adapter_state_dict(model, adapter_name)
    # Tied/shared tensors must be stored once: safetensors refuses aliases.
    seen: dict[int, str] = {}
    for k in list(tensors):
        ptr = tensors[k].data_ptr()
        if ptr in seen and tensors[k].numel() > 0:
            tensors[k] = tensors[k].clone()
        seen[ptr] = k
    meta = {"format": "pt", "peftlab_method": config.method}
    atomic_write_with(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    doc = dict(spec.peft_export(config)) if spec.peft_export else {}
    doc["base_model_name_or_path"] = base_model_name_or_path or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if "fan_in_fan_out" in doc:
        from peftlab.core.matching import Conv1D

        doc["fan_in_fan_out"] = any(Conv1D and isinstance(m, Conv1D) for m in model.modules())
    doc["peftlab"] = {
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
    }

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(doc, indent=2, default=str))

    atomic_write_with(path / CONFIG_NAME, write_json)
    return path


def read_adapter_config(path: str | os.PathLike) -> MethodConfig:
    """The method config stored in an adapter directory (peftlab's or peft's).

    Raises:
        AdapterFileError: the file is missing, not JSON, or holds a value of the wrong type or
            range (the message names the file, the key, the value and what is allowed).
    """
    return _read_config(Path(path))[0]


def _read_config(path: Path) -> tuple[MethodConfig, bool]:
    """:func:`read_adapter_config`, and whether peft wrote the file (no ``peftlab`` section)."""
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(
            f"{cfg_file} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_file} is not valid JSON ({e}); the file is corrupt") from e
    try:
        check(isinstance(doc, dict), "adapter_config.json", doc, "a JSON object")
        own = doc.get("peftlab")
        if own is None:
            return _from_peft(doc), True
        check(isinstance(own, dict), "peftlab", own, 'an object with a "config" object')
        check(isinstance(own.get("config"), dict), "peftlab.config", own.get("config"), "an object")
        return config_from_dict(own["config"]), False
    except ConfigError as e:
        raise AdapterFileError(f"{cfg_file}: {e}") from None


def _from_peft(doc: dict) -> MethodConfig:
    """Translate a peft ``LoraConfig`` (or ``LoHaConfig``, ``LoKrConfig``, ``VeraConfig``)
    document into a peftlab config."""
    readers = {"LOHA": _lycoris_from_peft, "LOKR": _lycoris_from_peft, "VERA": _vera_from_peft,
               "IA3": _ia3_from_peft}  # fmt: skip
    if doc.get("peft_type") in readers:
        config = readers[doc["peft_type"]](doc)
        return config.replace(modules_to_save=_peft_modules_to_save(doc))
    if doc.get("peft_type") != "LORA":
        raise ConfigError(
            f"peft_type={doc.get('peft_type')!r} is not supported for import; peftlab reads "
            f"peft LORA adapters (plain, rsLoRA, DoRA, PiSSA, OLoRA), LOHA, LOKR, VERA and IA3"
        )
    if doc.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={doc['bias']!r} is not supported")
    absent = [k for k in ("r", "lora_alpha", "target_modules") if k not in doc]
    if absent:
        raise ConfigError(
            f"{', '.join(absent)} missing: a peft LoRA adapter_config.json has r, "
            f"lora_alpha and target_modules"
        )
    init = doc.get("init_lora_weights", True)
    if init in (True, False, "eva", "orthogonal"):  # the base weights are left as they were
        init = "kaiming"
    elif init not in ("gaussian", "pissa", "olora"):
        raise ConfigError(
            f"peft option init_lora_weights={init!r} is not supported for import: its base "
            f"weights cannot be rebuilt here; save it from peft as a conventional LoRA "
            f"(path_initial_model_for_weight_conversion)"
        )
    use_dora = doc.get("use_dora", False)
    check(isinstance(use_dora, bool), "use_dora", use_dora, "true or false")
    target = doc["target_modules"]
    if isinstance(target, list) and all(isinstance(t, str) for t in target):
        target = sorted(target)  # peft writes a set, in no fixed order
    d = {
        "method": "dora" if use_dora else "lora",
        "r": doc["r"],
        "alpha": doc["lora_alpha"],
        "dropout": doc.get("lora_dropout", 0.0),
        "target_modules": target,
        "use_rslora": doc.get("use_rslora", False),
        "init": init,
        "rank_pattern": doc.get("rank_pattern") or None,
        "alpha_pattern": doc.get("alpha_pattern") or None,
        "layers_to_transform": doc.get("layers_to_transform"),
        "layers_pattern": doc.get("layers_pattern") or None,
        "modules_to_save": _peft_modules_to_save(doc),
    }
    try:
        return config_from_dict(d)
    except ConfigError as e:  # name the key as the file spells it
        msg = str(e)
        for ours, theirs in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
            if msg.startswith(f"{ours}="):
                msg = msg.replace(ours, theirs, 2)
        raise ConfigError(msg) from None


def _lycoris_from_peft(doc: dict) -> MethodConfig:
    """A peft ``LoHaConfig`` / ``LoKrConfig`` document as peftlab's ``loha`` / ``lokr``."""
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if doc.get(key):
            raise ConfigError(f"peft option {key}={doc[key]!r} is not supported for LoHa/LoKr")
    for key in ("rank_dropout", "module_dropout", "use_effective_conv2d", "rank_dropout_scale"):
        if doc.get(key):
            raise ConfigError(f"peft option {key}={doc[key]!r} is not supported (0/false only)")
    target = doc.get("target_modules")
    if isinstance(target, list) and all(isinstance(t, str) for t in target):
        target = sorted(target)
    d = {"r": doc.get("r"), "alpha": doc.get("alpha"), "target_modules": target}
    d["init_weights"] = doc.get("init_weights", True) is not False
    if doc["peft_type"] == "LOKR":
        d.update(method="lokr", decompose_both=bool(doc.get("decompose_both", False)),
                 decompose_factor=doc.get("decompose_factor", -1))  # fmt: skip
    else:
        d["method"] = "loha"
    return config_from_dict(d)


def _vera_from_peft(doc: dict) -> MethodConfig:
    """A peft ``VeraConfig`` document as peftlab's ``vera``."""
    for key in ("layers_to_transform", "layers_pattern"):
        if doc.get(key):
            raise ConfigError(f"peft option {key}={doc[key]!r} is not supported for VeRA")
    if doc.get("bias", "none") != "none":
        raise ConfigError(f"peft option bias={doc['bias']!r} is not supported (none only)")
    target = doc.get("target_modules")
    if isinstance(target, list) and all(isinstance(t, str) for t in target):
        target = sorted(target)
    d = {"method": "vera", "r": doc.get("r"), "target_modules": target}
    same = ("projection_prng_key", "save_projection", "d_initial", "init_weights")
    names = {"dropout": "vera_dropout", **{k: k for k in same}}
    d.update({ours: doc[theirs] for ours, theirs in names.items() if theirs in doc})
    try:
        return config_from_dict(d)
    except ConfigError as e:  # name the key as the file spells it
        msg = str(e)
        raise ConfigError(
            msg.replace("dropout", "vera_dropout", 2) if msg.startswith("dropout=") else msg
        ) from None


def _ia3_from_peft(doc: dict) -> MethodConfig:
    """A peft ``IA3Config`` document as peftlab's ``ia3``."""
    if doc.get("target_modules") is None:
        raise ConfigError("target_modules missing: a peft IA3 adapter_config.json names them")
    d = {"method": "ia3"}
    for key in ("target_modules", "feedforward_modules"):
        value = doc.get(key)
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            value = sorted(value)  # peft writes sets, in no fixed order
        d[key] = value
    if "init_ia3_weights" in doc:
        d["init_ia3_weights"] = doc["init_ia3_weights"]
    return config_from_dict(d)


def _peft_modules_to_save(doc: dict) -> list[str] | None:
    """peft's ``modules_to_save`` (sorted: peft writes a set). peft adds ``["classifier",
    "score"]`` to every sequence-classification adapter and ignores entries that name no
    module; :func:`load_adapter` keeps the ones the model has."""
    value = doc.get("modules_to_save")
    if value is None:
        return None
    check(
        isinstance(value, list) and all(isinstance(v, str) and v for v in value),
        "modules_to_save",
        value,
        "a list of module names",
    )
    return sorted(set(value))


def _present(model: nn.Module, config: MethodConfig) -> MethodConfig:
    """``config`` of a peft file read as peft reads it on ``model``: ``modules_to_save``
    entries that name no module left out (``"score"`` on a BERT classifier), and target-list
    entries whose every module is saved in full left out too (peft skips those: its
    "all-linear", written out, names a classifier that ``modules_to_save`` also names)."""
    if not config.modules_to_save:
        return config
    names = [n for n, _ in model.named_modules() if n]

    def hits(entry: str) -> list[str]:
        return [n for n in names if matches_target(n, [entry])]

    kept = [e for e in config.modules_to_save if hits(e)]
    config = config.replace(modules_to_save=kept)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, list | tuple):
        saved = {n for e in kept for n in hits(e)}
        inside = [t for t in targets if not hits(t) or not all(
            any(n == s or n.startswith(s + ".") for s in saved) for n in hits(t))]  # fmt: skip
        if inside != list(targets):
            config = config.replace(target_modules=inside)
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" It holds {pickled}: peftlab never unpickles files (they can run code); convert "
            f"them to safetensors with safetensors.torch.save_file in a trusted environment."
            if pickled
            else ""
        )
        raise AdapterFileError(f"{weights} not found.{hint}")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{weights} is not a readable safetensors file ({e}); it is corrupt or truncated — "
            f"re-save the adapter"
        ) from e


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", strict: bool = True
) -> nn.Module:
    """Apply the adapter stored in ``path`` to the base ``model`` and load its weights.

    Atomic, like :func:`peftlab.apply`: a refusal leaves the model (and the adapters already on
    it) exactly as it was.

    Raises:
        AdapterFileError: the directory is missing or corrupt, a value in its config has the
            wrong type, a tensor is not floating point or not finite, or the tensors do not fit
            the model (the message names the missing, unexpected and mis-shaped keys).
    """
    path = Path(path)
    config, from_peft = _read_config(path)
    if from_peft:
        config = _present(model, config)
    tensors = read_weights(path)
    spec = get_method(config.method)
    with adding_adapter(model):
        # The file names the modules it trained in full: None there means none.
        attach_adapter(model, config, adapter_name, resolve_head=False)
        expected: dict[str, torch.Tensor] = {}
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            key = file_key(name, adapter_name, spec.param_prefix)
            if key is not None and spec.file_key is not None:
                key = spec.file_key(config, key)
            if key is not None and (spec.param_prefix or key in tensors):
                expected[key] = t
        for module_name in saved_modules(model, adapter_name):
            for name, t in model.get_submodule(module_name).state_dict(keep_vars=True).items():
                expected[f"{KEY_PREFIX}{module_name}.{name}"] = t
        drop_copied_base_weights(path, model, tensors, expected)
        check_fit(path, config, tensors, expected, strict and bool(spec.param_prefix), strict)
        # Nothing can refuse past this point: the writes into existing weights come last.
        with torch.no_grad():
            for key, t in expected.items():
                if key in tensors:
                    t.copy_(tensors[key].to(t.dtype))
        set_adapter(model, adapter_name)
    # DoRA and similar caches derived from loaded weights are keyed on tensor versions, so
    # the copies above invalidate them.
    return model


def drop_copied_base_weights(
    path: Path, model: nn.Module, tensors: dict[str, torch.Tensor], expected: dict
) -> None:
    """Take out of ``tensors`` the base weights of adapted layers that peft writes beside an
    adapter on embeddings (``….embed_tokens.base_layer.weight``, its ``save_embedding_layers``)
    when they equal the model's; refuse when they differ (the adapter was trained on other
    embeddings: a resized vocabulary) rather than overwrite the user's base model."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied table: both names
    for key in [k for k in tensors if k not in expected and ".base_layer." in k]:
        mine = params.get(key.removeprefix(KEY_PREFIX))
        if mine is None:
            continue
        t = tensors[key]
        if t.shape == mine.shape and torch.equal(t.to(mine.dtype), mine.detach()):
            del tensors[key]
            continue
        raise AdapterFileError(
            f"{path / WEIGHTS_NAME} carries base weights {key} {tuple(t.shape)} that differ from "
            f"this model's {tuple(mine.shape)}: the adapter was trained on other embeddings (a "
            f"resized vocabulary?); load it on that model (resize_token_embeddings and load the "
            f"trained embeddings first)"
        )


def check_fit(
    path: Path,
    config: MethodConfig,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    missing_is_error: bool,
    unexpected_is_error: bool,
) -> None:
    """Raise :class:`AdapterFileError` unless the file's tensors fit the model's places."""
    weights = path / WEIGHTS_NAME
    for key in sorted(set(expected) & set(tensors)):
        t = tensors[key]
        if expected[key].is_floating_point() and not t.is_floating_point():
            raise AdapterFileError(
                f"{weights}: tensor {key} has dtype {t.dtype}; adapter tensors must be floating "
                f"point (float32, float16 or bfloat16)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFileError(
                f"{weights}: tensor {key} holds {bad} non-finite value(s) (inf or nan); adapter "
                f"tensors must be finite — the run that saved it diverged"
            )
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing_is_error and missing:
        problems.append(f"missing keys {missing[:4]}{' …' if len(missing) > 4 else ''}")
    if unexpected_is_error and unexpected:
        problems.append(
            f"keys the model has no place for {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}"
        )
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {shapes[:4]}{' …' if len(shapes) > 4 else ''}")
    if problems:
        raise AdapterFileError(
            f"adapter {path} does not fit this model: {'; '.join(problems)}. Load it on the base "
            f"model it was trained from (config {config.method}, {config.to_dict()})"
        )
