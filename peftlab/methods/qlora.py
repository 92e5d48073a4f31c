"""QLoRA: LoRA on a 4-bit NormalFloat base (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

    h = dequant(W0_NF4)·x + s·B·A·x        (QDoRA: DoRA's formula with W0 = dequant(W0_NF4))

Every targeted linear layer (default "all-linear", which the paper found necessary to match
16-bit fine-tuning) is replaced by a bitsandbytes ``Linear4bit`` holding NF4 codes in blocks
of 64 weights, each block with one absmax scale; double quantization stores those scales in
8 bits (blocks of 256, one fp32 scale each) — ~4.127 bits per weight instead of 4.5. The
4-bit weights stay frozen; only the LoRA (or DoRA) parameters train, in ``compute_dtype``.

Merging is done against the weights the adapter was trained with: ``merge`` swaps the 4-bit
layer for a dense one holding dequant(W0_NF4) + ΔW (``unmerge`` swaps the untouched 4-bit
layer back), so ``merge_and_unload(model, dequantize=True)`` is a plain float model whose
logits equal the QLoRA model's. ``dequantize=False`` re-quantizes the merged weights and logs
how far the logits moved.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftlab.core.config import ConfigError, check
from peftlab.core.matching import find_targets, is_embedding, set_submodule
from peftlab.core.model import adapter_configs, check_free
from peftlab.core.registry import LOW_RANK_LRS, MethodSpec, Tuning, register_method
from peftlab.core.weights import dense_weight, is_quantized
from peftlab.methods import _loftq
from peftlab.methods.dora import DoRAConfig, DoRALinear
from peftlab.methods.lora import (
    LoRAConfig,
    LoRALinear,
    add_low_rank_adapters,
    embedding_file_key,
    peft_lora_fields,
)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_FIELDS = ("quant_type", "double_quant", "blocksize")
"""Settings that define the 4-bit base; every QLoRA adapter on one model must share them."""


@dataclasses.dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """LoRA (or DoRA) adapters on 4-bit NormalFloat base weights with double quantization."""

    preserves_output_at_init = False  # the 4-bit base differs from the float one by its rounding
    extra_inits = (_loftq.INIT,)

    quant_type: str = "nf4"
    """4-bit data type: "nf4" (NormalFloat, information-theoretically optimal for normally
    distributed weights; the QLoRA default) or "fp4". Set explicitly: bitsandbytes defaults to fp4."""
    double_quant: bool = True
    """Quantize the per-block absmax scales to 8 bits (blocks of 256): 4.127 instead of 4.5 bits
    per weight."""
    blocksize: int = 64
    """Weights per quantization block (one absmax scale each); smaller is more accurate."""
    compute_dtype: str = "float32"
    """dtype the 4-bit weights are dequantized to for each matmul: "float32", "bfloat16" (the
    paper's choice on GPUs) or "float16"."""
    use_dora: bool = False
    """Put DoRA adapters (magnitude + direction) on the 4-bit base instead of LoRA (QDoRA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: far less activation memory for one extra
    forward pass per step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.quant_type in QUANT_TYPES, "quant_type", self.quant_type, '"nf4" or "fp4"')
        check(
            self.blocksize in BLOCKSIZES,
            "blocksize",
            self.blocksize,
            f"one of bitsandbytes' 4-bit block sizes {BLOCKSIZES}",
        )
        check(
            self.compute_dtype in DTYPES,
            "compute_dtype",
            self.compute_dtype,
            f"one of {list(DTYPES)}",
        )
        check(
            isinstance(self.double_quant, bool), "double_quant", self.double_quant, "true or false"
        )

    def adapter_config(self) -> LoRAConfig:
        """The LoRA (or, with ``use_dora``, DoRA) config of the adapters on the 4-bit base
        (LoftQ's factors are written over the layers' kaiming init afterwards)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoRAConfig)}
        if fields["init"] == _loftq.INIT:
            fields["init"] = "kaiming"
        return DoRAConfig(**fields) if self.use_dora else LoRAConfig(**fields)


class _QuantizedBaseMerge:
    """Merging for adapter layers on a 4-bit base: ``merge`` swaps in a dense layer holding
    the dequantized weights + the update, ``unmerge`` swaps the 4-bit layer back bit-exactly."""

    def merge(self) -> None:
        if self.disabled or all(n in self.merged for n in self.active):
            return
        if is_quantized(self.base_layer):
            from peftlab.methods.nf4 import dequantized_layer

            self._quantized = [self.base_layer]  # a list: not registered as a submodule
            self.base_layer = dequantized_layer(self.base_layer)
        super().merge()

    def unmerge(self) -> None:
        super().unmerge()
        if getattr(self, "_quantized", None):
            self.base_layer = self._quantized.pop()

    def unload(self, merge: bool = True, dequantize: bool = True, **kwargs) -> nn.Module:
        """The merged layer: dense (``dequantize``) or re-quantized to 4 bits; without
        ``merge``, the untouched 4-bit base layer."""
        from peftlab.methods.nf4 import dequantized_layer, requantize

        if not merge:
            self.unmerge()
            return self.base_layer
        self.merge()
        base = self.base_layer
        if is_quantized(base):  # nothing was merged (no active adapter)
            return dequantized_layer(base) if dequantize else base
        if dequantize or not getattr(self, "_quantized", None):  # or a base kept in float
            return base
        q = requantize(base, self._quantized[0])
        q.__dict__["_peftlab_dense"] = base  # for the logit-drift log in _unload_model
        return q


class QLoRALinear(_QuantizedBaseMerge, LoRALinear):
    """LoRA adapters on a 4-bit base layer."""


class QDoRALinear(_QuantizedBaseMerge, DoRALinear):
    """DoRA adapters on a 4-bit base layer (QDoRA)."""


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> None:
    """Get a model with 4-bit layers ready to train adapters on it (as the QLoRA recipe does).

    Every 16-bit parameter left outside the 4-bit layers — layer norms above all, whose
    statistics suffer from 16-bit rounding, and with them the embeddings and the output head —
    is cast to float32: a float32 norm turns the hidden states float32, and a 16-bit head or
    norm downstream could not take them. With ``gradient_checkpointing`` the model recomputes
    activations in backward; since every base weight is frozen, the input embeddings are made
    to require grad so the checkpointed blocks still have a grad path to the adapters.
    """
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if enable is None:
            raise ConfigError(
                f"gradient_checkpointing=True needs a transformers PreTrainedModel; "
                f"{type(model).__name__} has no gradient_checkpointing_enable"
            )
        if getattr(model, "_require_grads_hook", None) is None:
            model.enable_input_require_grads()
        enable()


def kept_in_float(model: nn.Module, names: list[str]) -> set[str]:
    """Of ``names``, the layers the model's class keeps in float32 whatever the quantization
    (``_keep_in_fp32_modules``, matched on name components as transformers does: T5's ``wo``,
    whose input T5 casts to the layer's weight dtype — a 4-bit weight would make it uint8)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return {n for n in names if keep & set(n.split("."))}


def _apply(model: nn.Module, config: QLoRAConfig, adapter_name: str) -> None:
    for name, other in adapter_configs(model).items():
        diff = [k for k in QUANT_FIELDS if getattr(other, k) != getattr(config, k)]
        if diff:
            raise ConfigError(
                f"adapter {name!r} already quantized this model with "
                f"{ {k: getattr(other, k) for k in diff} }; a second QLoRA adapter must use the "
                f"same {', '.join(diff)} (got { {k: getattr(config, k) for k in diff} })"
            )
    from peftlab.methods.nf4 import adopt_4bit, quantize_linear

    compute_dtype = DTYPES[config.compute_dtype]
    layer_cls = QDoRALinear if config.use_dora else QLoRALinear
    found = find_targets(model, config.target_modules, embeddings=True)
    targets = [n for n in found if not is_embedding(model.get_submodule(n))]  # kept in float
    loftq = config.init == _loftq.INIT
    for name in targets:  # every layer is checked before any is quantized
        module = model.get_submodule(name)
        check_free(name, module, layer_cls)
        if loftq and (isinstance(module, LoRALinear) or is_quantized(module)):
            raise ConfigError(
                f"init='loftq' needs the 16/32-bit weights of {name}, which is already 4-bit "
                f"(loaded in 4 bits or quantized by another adapter); apply it to the float model"
            )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    adapter = config.adapter_config()
    kept = kept_in_float(model, targets)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            continue  # quantized by an earlier adapter
        if is_quantized(module):  # loaded in 4 bits (transformers' BitsAndBytesConfig)
            adopt_4bit(name, module)
            continue
        if name in kept:
            continue  # the model needs it in float (T5's wo): LoRA on the float layer
        q = quantize_linear(
            module, config.quant_type, config.double_quant, config.blocksize, compute_dtype
        )
        if loftq:
            one = adapter.for_module(name)
            factors[name] = _loftq.correction(
                dense_weight(module), dense_weight(q), one.r, one.scaling
            )
        set_submodule(model, name, q)
    prepare_for_kbit_training(model, config.gradient_checkpointing)
    add_low_rank_adapters(model, adapter, adapter_name, layer_cls)
    for name, pair in factors.items():
        _loftq.initialize(model.get_submodule(name), adapter_name, pair)


def _unload_model(model: nn.Module) -> None:
    """Undo k-bit preparation; after a re-quantizing merge, measure and log the logit drift."""
    if any(getattr(c, "gradient_checkpointing", False) for c in adapter_configs(model).values()):
        model.disable_input_require_grads()
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
    if any("_peftlab_dense" in m.__dict__ for m in model.modules()):
        from peftlab.methods.nf4 import log_requantization_drift

        log_requantization_drift(model)


def _export(model: nn.Module, adapter_name: str) -> tuple[QLoRAConfig, dict]:
    """A LoftQ-initialized adapter is saved as a plain QLoRA adapter (``init`` kaiming): LoftQ
    chose its starting point only, and loading it must not recompute it (the base may be
    4-bit by then)."""
    config = adapter_configs(model)[adapter_name]
    if config.init == _loftq.INIT:
        config = dataclasses.replace(config, init="kaiming")
    return config, {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _peft_fields(config: QLoRAConfig) -> dict:
    return {**peft_lora_fields(config), "use_dora": config.use_dora}


register_method(
    MethodSpec(
        "qlora",
        QLoRAConfig,
        _apply,
        "lora_",
        peft_export=_peft_fields,
        unload=_unload_model,
        export=_export,
        file_key=embedding_file_key,
        tuning=Tuning(1e-3, {"lr": LOW_RANK_LRS, "r": (8, 16, 32)}),
    )
)
