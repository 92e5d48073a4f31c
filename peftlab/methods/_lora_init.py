"""LoRA initialized from the weight it adapts: PiSSA and OLoRA.

Both start the trainable factors on a principal part of the base weight ``W`` (``[out, in]``)
and move that part out of the frozen weight, so the adapted model computes exactly the base
model's function at init, while training starts where ``W`` carries the most:

- **PiSSA** (Meng et al. 2024, https://arxiv.org/abs/2404.02948): with the SVD
  ``W = U·diag(S)·Vᵀ`` and ``S_r`` the ``r`` largest singular values divided by the scaling
  ``s``, ``B₀ = U_r·diag(√S_r)`` and ``A₀ = diag(√S_r)·V_rᵀ``, so ``s·B₀A₀ = U_r·diag(S_r)·V_rᵀ``
  is the best rank-``r`` approximation of ``W``.
- **OLoRA** (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): with the QR decomposition
  ``W = Q·R``, ``B₀ = Q[:, :r]`` (orthonormal columns) and ``A₀ = R[:r]``.

In both the frozen weight becomes the residual ``W_res = W − s·B₀A₀`` (computed in float32,
stored in the weight's dtype), and the layer computes ``W_res·x + s·B·A·x`` with ``B, A``
starting at ``B₀, A₀`` — the same function as ``W·x`` at init, up to rounding.

**What that changes.** The base weight is the residual while the adapter is on the model:
disabling the adapter gives the residual model (as in peft), so such an adapter must be the
only adapter on the model, and mixed batches, ``combine`` and a hot swap from another init are
refused. Unloading without merging restores ``W = W_res + s·B₀A₀`` (``B₀, A₀`` are kept, not
saved); merging gives ``W_res + s·B·A``, the trained model. An adapter file records the init,
so loading it on the original base model recomputes ``W_res`` (deterministically) before
its ``B, A`` are loaded — in peftlab and in peft alike.

**A conventional adapter** (:func:`conventional`, ``save_adapter(..., conventional=True)``)
applies to the *original* base: ``s·B·A − s·B₀A₀`` as one LoRA of rank ``2r``,
``A' = [A; A₀]``, ``B' = [B, −B₀]``, scaling unchanged (alpha doubled, or ×√2 with rsLoRA),
initialized as plain LoRA — usable wherever a LoRA adapter is, merged exactly.
"""

from __future__ import annotations

import math

import torch

from peftlab.core.config import ConfigError
from peftlab.core.weights import dense_weight, is_quantized, write_dense_weight

RESIDUAL_INITS = ("pissa", "olora")
"""LoRA inits that move a principal part of the base weight into the adapter."""


@torch.no_grad()
def principal_factors(w: torch.Tensor, r: int, scaling: float, init: str):
    """``(A₀, B₀)`` (float32, ``[r, in]`` and ``[out, r]``) of ``init`` for weight ``w``."""
    w = w.to(torch.float32)
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def init_residual(layer, name: str, init: str) -> None:
    """Set adapter ``name``'s factors of ``layer`` (a LoRALinear) to ``init``'s and write the
    residual into its base weight; ``B₀, A₀`` are kept in ``layer._residual``."""
    base = layer.base_layer
    if is_quantized(base) or not base.weight.is_floating_point():
        raise ConfigError(
            f"init={init!r} needs a float base weight to decompose; this model's weights are "
            f"quantized. Use init='kaiming', or method 'qlora'"
        )
    a_lin, b_lin = layer.lora_A[name], layer.lora_B[name]
    r = a_lin.weight.shape[0]
    if r > min(layer.in_features, layer.out_features):
        raise ConfigError(
            f"r={r} is invalid with init={init!r}: a rank-{r} part of a "
            f"{layer.out_features}×{layer.in_features} weight does not exist; use r <= "
            f"{min(layer.in_features, layer.out_features)}"
        )
    scaling = layer.scaling[name]
    w = dense_weight(base)
    a0, b0 = principal_factors(w, r, scaling, init)
    a_lin.weight.copy_(a0)
    b_lin.weight.copy_(b0)
    write_dense_weight(base, (w.to(torch.float32) - scaling * (b0 @ a0)).to(w.dtype))
    layer._residual[name] = (a0.to(a_lin.weight.dtype), b0.to(b_lin.weight.dtype))


@torch.no_grad()
def restore_base(layer) -> None:
    """Add every residual-init adapter's ``s·B₀A₀`` back into ``layer``'s base weight (its
    original value, up to rounding) and forget them."""
    for name, (a0, b0) in list(layer._residual.items()):
        w = dense_weight(layer.base_layer)
        delta = layer.scaling[name] * (b0.to(torch.float32) @ a0.to(torch.float32))
        write_dense_weight(layer.base_layer, (w.to(torch.float32) + delta).to(w.dtype))
        del layer._residual[name]


def residual_adapters(model) -> list[str]:
    """Names of the adapters on ``model`` initialized with PiSSA/OLoRA."""
    from peftlab.core.state import adapter_configs

    return [
        n for n, c in adapter_configs(model).items() if getattr(c, "init", "") in RESIDUAL_INITS
    ]


def check_alone(model, config, adapter_name: str) -> None:
    """A PiSSA/OLoRA adapter must be the model's only adapter (see the module docstring)."""
    from peftlab.core.state import adapter_configs

    others = sorted(adapter_configs(model))
    residual = residual_adapters(model)
    if others and (config.init in RESIDUAL_INITS or residual):
        which = residual[0] if residual else adapter_name
        init = adapter_configs(model)[which].init if residual else config.init
        raise ConfigError(
            f"adapter {which!r} is initialized with init={init!r}, which moves part of "
            f"the base weights into it, so it cannot share the model with another adapter "
            f"(the model has {others}). Save it with conventional=True and load that, or use "
            f"a fresh model"
        )


def conventional(model, adapter_name: str):
    """``(config, tensors)`` of the conventional rank-``2r`` LoRA equal to the residual-init
    adapter ``adapter_name`` on the original base (see the module docstring)."""
    from peftlab.core.io import KEY_PREFIX, adapter_state_dict
    from peftlab.core.state import adapter_configs
    from peftlab.methods.lora import LoRALinear

    config = adapter_configs(model)[adapter_name]
    tensors = adapter_state_dict(model, adapter_name)
    for lname, layer in model.named_modules():
        if not isinstance(layer, LoRALinear) or adapter_name not in layer._residual:
            continue
        a0, b0 = layer._residual[adapter_name]
        for key in list(tensors):
            if key.startswith(f"{KEY_PREFIX}{lname}.lora_A."):
                tensors[key] = torch.cat([tensors[key], a0.to(tensors[key].dtype)], 0)
            elif key.startswith(f"{KEY_PREFIX}{lname}.lora_B."):
                tensors[key] = torch.cat([tensors[key], -b0.to(tensors[key].dtype)], 1)
    grow = math.sqrt(2) if config.use_rslora else 2.0  # alpha' keeps alpha'/f(2r) = alpha/f(r)
    new = config.replace(
        init="kaiming",
        r=2 * config.r,
        alpha=config.alpha * grow,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()} or None,
        alpha_pattern={k: v * grow for k, v in (config.alpha_pattern or {}).items()} or None,
    )
    return new, tensors
