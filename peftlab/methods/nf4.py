"""4-bit base layers for QLoRA: quantize, dequantize, re-quantize, and measure what it costs.

Imports bitsandbytes (several seconds on a CPU machine), so ``peftlab.methods.qlora`` imports
this module only when a QLoRA adapter is applied.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Params4bit
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.matching import Conv1D, set_submodule
from peftlab.core.weights import dense_weight, dequantize_4bit, features, is_quantized

log = logging.getLogger("peftlab.qlora")


class Linear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` that computes correctly on the CPU and never repacks itself.

    bitsandbytes' CPU matmul decodes rows whose length is not a multiple of the blocksize
    wrongly (see :func:`peftlab.core.weights.dequantize_4bit`); those layers run here as a
    plain matmul with the correctly dequantized weight, everything else as bitsandbytes does.
    Its AVX512-BF16 inference path rewrites the stored codes on the first ``eval`` call and
    undoes double quantization (4.127 → 4.5 bits, lossy to revert); it is switched off so the
    4-bit weights stay exactly what was quantized. ``peftlab_conv1d`` records a layer that was
    a GPT-2 ``Conv1D``, so dequantizing restores that type.
    """

    def __init__(self, *args, peftlab_conv1d: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.support_avx512bf16_for_cpu = False
        self.peftlab_conv1d = peftlab_conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` → ``(..., out)``."""
        qs = self.weight.quant_state
        if x.device.type != "cpu" or qs.shape[-1] % qs.blocksize == 0:
            return super().forward(x)
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        w = dequantize_4bit(self.weight).to(dtype)
        return nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)


def adopt_4bit(name: str, module: nn.Module) -> None:
    """Take over ``module``, a layer bitsandbytes quantized when the model was loaded
    (transformers' ``BitsAndBytesConfig``), as the base of an adapter.

    It becomes a :class:`Linear4bit` in place (same weights and quant state; only its class
    changes), so it computes correctly on the CPU and is never repacked. Refused when the
    repacking already happened: the codes can no longer be read exactly.
    """
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise ConfigError(
            f"{name} was repacked by bitsandbytes' CPU inference path (the model ran in eval "
            f"mode before apply), so its 4-bit weights can no longer be read exactly; apply "
            f"the adapter right after loading the model, before any inference call"
        )
    module.support_avx512bf16_for_cpu = False
    if type(module) is bnb.nn.Linear4bit:
        module.__class__ = Linear4bit
        module.peftlab_conv1d = False


def quantize_linear(
    layer: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = torch.float32,
) -> Linear4bit:
    """A 4-bit copy of the ``nn.Linear``/``Conv1D`` ``layer``, quantized on its device.

    The bias is shared, not copied. GPT-2's ``Conv1D`` stores ``[in, out]``; it is transposed
    into the ``[out, in]`` layout ``Linear4bit`` computes with.
    """
    if not layer.weight.is_floating_point():
        raise ConfigError(
            f"cannot quantize a {type(layer).__name__} whose weight is {layer.weight.dtype}: it "
            f"is already quantized (e.g. 8-bit); load the model in 16/32-bit for QLoRA"
        )
    in_f, out_f = features(layer)
    w = dense_weight(layer).detach().contiguous()
    q = Linear4bit(
        in_f,
        out_f,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
        peftlab_conv1d=bool(Conv1D and isinstance(layer, Conv1D)),
    )
    # Moving a not-yet-quantized Params4bit to a device is what quantizes it.
    q.weight = Params4bit(
        w,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=q,
    ).to(w.device)
    q.bias = layer.bias
    return q


def dequantized_layer(layer: nn.Module) -> nn.Module:
    """A dense layer with the dequantized weights of the 4-bit ``layer`` and its bias: an
    ``nn.Linear``, or a ``Conv1D`` where the 4-bit layer was made from one."""
    w = dense_weight(layer).detach()
    out_f, in_f = w.shape
    if getattr(layer, "peftlab_conv1d", False):
        dense = Conv1D(out_f, in_f)
        dense.weight = nn.Parameter(w.T.contiguous(), requires_grad=False)
    else:
        dense = nn.Linear(in_f, out_f, bias=False, device="meta")
        dense.weight = nn.Parameter(w, requires_grad=False)
    dense.bias = layer.bias
    return dense


def requantize(dense: nn.Module, like: nn.Module) -> Linear4bit:
    """Quantize the dense layer ``dense`` with the settings of the 4-bit layer ``like``."""
    w = like.weight
    return quantize_linear(
        dense, w.quant_type, w.compress_statistics, w.blocksize, like.compute_dtype
    )


def _state_bytes(qs) -> tuple[int, int]:
    """(bytes of the per-block constants incl. nested ones, bytes of the code lookup tables)."""
    constants = qs.absmax.numel() * qs.absmax.element_size()
    tables = qs.code.numel() * qs.code.element_size()
    if qs.nested:
        s2 = qs.state2
        constants += s2.absmax.numel() * s2.absmax.element_size()
        constants += (
            qs.offset.numel() * qs.offset.element_size() if torch.is_tensor(qs.offset) else 4
        )
        tables += s2.code.numel() * s2.code.element_size()
    return constants, tables


def quantized_memory(model: nn.Module) -> dict[str, float]:
    """What ``model``'s tensors occupy, split by kind (shared tensors counted once).

    Returns:
        ``quantized_weight_bytes`` (packed 4-bit codes), ``quant_constant_bytes`` (absmax per
        block; with double quantization the 8-bit absmax, their fp32 scales and the offset),
        ``lookup_table_bytes`` (each layer's 16-entry code table and, nested, the 256-entry
        one — constants of the data type, identical in every layer and not counted per
        weight), ``other_bytes`` (every other parameter and buffer: embeddings, norms,
        adapters), ``quantized_params`` (weights stored in 4 bits), ``bits_per_param``
        (8 × (codes + constants) / quantized_params; 0 when nothing is quantized).
    """
    seen: set[int] = set()
    out = dict.fromkeys(
        ("quantized_weight_bytes", "quant_constant_bytes", "lookup_table_bytes", "other_bytes"), 0
    )
    n_quantized = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        size = t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is None:
            out["other_bytes"] += size
            continue
        constants, tables = _state_bytes(qs)
        out["quantized_weight_bytes"] += size
        out["quant_constant_bytes"] += constants
        out["lookup_table_bytes"] += tables
        n_quantized += qs.shape.numel()
    stored = out["quantized_weight_bytes"] + out["quant_constant_bytes"]
    return {
        **out,
        "quantized_params": n_quantized,
        "bits_per_param": 8 * stored / n_quantized if n_quantized else 0.0,
    }


def _probe_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def log_requantization_drift(model: nn.Module, probe_tokens: int = 16) -> dict[str, float] | None:
    """Measure and log how far re-quantizing a merged QLoRA model moved it.

    Layers that ``QLoRALinear.unload(dequantize=False)`` re-quantized carry their exact
    merged dense layer in ``_peftlab_dense``. The model is run on a fixed random token probe
    with the re-quantized layers and with the exact ones; the relative L2 difference of the
    logits (and of the weights) is logged, and the exact layers are then dropped.
    """
    pairs = [
        (n, m, m.__dict__.pop("_peftlab_dense"))
        for n, m in model.named_modules()
        if "_peftlab_dense" in m.__dict__
    ]
    if not pairs:
        return None
    weight_err = [
        (
            (dense_weight(q).float() - dense_weight(d).float()).norm()
            / dense_weight(d).float().norm()
        ).item()
        for _, q, d in pairs
    ]
    result = {"weight_rel_error": sum(weight_err) / len(weight_err)}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        device = next(q for _, q, _ in pairs).weight.device
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, probe_tokens), generator=g).to(device)
        was_training = model.training
        model.eval()
        try:
            requantized = _probe_logits(model, ids)
            for name, _, dense in pairs:
                set_submodule(model, name, dense)
            exact = _probe_logits(model, ids)
            result["logit_rel_drift"] = ((requantized - exact).norm() / exact.norm()).item()
            result["logit_max_abs_drift"] = (requantized - exact).abs().max().item()
        except (TypeError, ValueError, RuntimeError) as e:  # not a token model: weights only
            log.info("no logit probe for %s (%s)", type(model).__name__, e)
        finally:
            for name, q, _ in pairs:
                set_submodule(model, name, q)
            model.train(was_training)
    log.warning(
        "merge_and_unload(dequantize=False) re-quantized %d merged layers to 4 bits: logits "
        "moved by %s relative (max abs %s) on a %d-token random probe, weights by %.4f mean "
        "relative. dequantize=True returns the exact merged model instead.",
        len(pairs),
        _fmt(result.get("logit_rel_drift")),
        _fmt(result.get("logit_max_abs_drift")),
        probe_tokens,
        result["weight_rel_error"],
    )
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


__all__ = [
    "Linear4bit",
    "adopt_4bit",
    "dequantized_layer",
    "is_quantized",
    "log_requantization_drift",
    "quantize_linear",
    "quantized_memory",
    "requantize",
]
