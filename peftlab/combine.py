"""Combining named LoRA-family adapters (LoRA, rsLoRA, DoRA, QLoRA/QDoRA) into a new one.

Adapter ``i`` on one model holds, per adapted layer, ``A_i`` (``[r_i, in]``), ``B_i``
(``[out, r_i]``) and its scaling ``s_i`` (``alpha/r``; rsLoRA ``alpha/√r``), so its update is
``ΔW_i = s_i·B_i·A_i``. Given weights ``w_i``, :func:`combine` adds adapter ``new`` whose
update is, per method (a layer an adapter does not adapt counts as ``ΔW_i = 0`` there):

* ``linear`` — ``ΔW = Σ w_i·ΔW_i`` with the parts' rank and scaling, as a weighted sum of
  the *factors*. That sum is exact only where the parts share one factor per layer
  (``B = Σ w_i (s_i/s) B_i`` with the shared ``A``, or the mirror image), one adapter
  always included; elsewhere ``(Σ B_i)(Σ A_i)`` carries cross terms ``B_i·A_j``, so it is
  refused (peft's ``linear`` computes those cross terms silently) — use ``cat`` or ``svd``.
* ``cat`` — ``A = [A_1; A_2; …]`` (rows), ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]`` (columns),
  rank ``Σ r_i``, scaling 1 (``alpha = r``, no rsLoRA): ``B·A = Σ w_i s_i B_i A_i`` exactly.
* ``svd`` — the best rank-``k`` approximation (Eckart–Young) of ``Σ w_i·ΔW_i``, computed
  from the concatenated factors (QR of both, SVD of the ``Σr × Σr`` core), split as
  ``B = U_k √S_k``, ``A = √S_k V_kᵀ``, scaling 1. Exact when ``k ≥ Σ r_i`` (the default).
* ``ties`` (Yadav et al. 2023, https://arxiv.org/abs/2306.01708) — on the dense
  ``τ_i = ΔW_i`` of each layer: keep the ``⌈density·n⌉`` entries of largest ``|τ_i|``
  (trim), ``τ̂_i = w_i·trim(τ_i)``, elect ``γ = sign(Σ_i τ̂_i)`` per entry, and take the
  disjoint mean ``Σ_{i: sign τ̂_i = γ} τ̂_i / #{i: sign τ̂_i = γ}``. Not linear in the parts
  even at density 1 (a mean over the agreeing parts, not a sum); one part gives ``w·ΔW``.
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, https://arxiv.org/abs/2311.03099) — drop
  each entry of ``τ_i`` with probability ``1 - density`` and rescale the rest by
  ``1/density`` (a seeded generator: ``seed`` fixes the draw), then sum ``Σ w_i·τ̃_i``
  (``dare_linear``) or elect signs and take the disjoint mean as TIES (``dare_ties``). At
  density 1 nothing is dropped: ``dare_linear`` is the linear sum, ``dare_ties`` is TIES.

TIES and DARE produce a dense ``[out, in]`` update, generally of full rank; it is brought
back to rank ``k`` (default ``Σ r_i``) by truncated SVD as for ``svd``. That truncation is
the approximate step: :class:`CombineResult` reports ``relative_error``, the largest over the
layers of ``‖ΔW_target − s·B·A‖_F / ‖ΔW_target‖_F`` (from the discarded singular values;
0 for ``linear`` and ``cat``). Scalings are always folded into the factors, so rsLoRA parts
(``alpha/√r``) and parts of different ranks combine exactly where the method is exact.

**DoRA** (and QDoRA) adapters also hold a magnitude ``m_i`` (``[out]``) with
``W' = m ⊙ (W0 + ΔV)/‖W0 + ΔV‖``. That map is not linear in the parts, so the combination
is defined in DoRA's own parameters: the directional updates ``ΔV_i = s_i B_i A_i`` combine
as above, and the magnitudes as task vectors from their initial value ``m0 = ‖W0‖``
(rows of the base weight): ``m = m0 + combine_i(w_i, m_i − m0)`` by the same method
(``linear``/``cat``/``svd``/``dare_linear``: the weighted sum; ``ties``/``dare_ties``: the
same trim or drop, election and disjoint mean on the magnitude vector). One part at weight 1
gives back exactly its ``ΔV`` and ``m``; ``cat`` of two sums their ``ΔV`` and their ``m − m0``.

**QLoRA**: the factors on a 4-bit base combine as LoRA's; QDoRA's ``m0`` is the row norm of
the dequantized base. **Biases**: peftlab's LoRA has no bias term (peft's ``lora_bias``),
so there is none to combine. Refused, in one line and with the model unchanged: an empty or
non-dict ``weights``, an unknown name, a weight that is not a finite number, adapters of
other methods or a mix of LoRA and DoRA parts, parts that train modules in full
(``modules_to_save``: each adapter's own copy, not low-rank), a ``density`` outside
``(0, 1]``, a ``rank`` below 1, and options given to a method that does not use them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from peftlab.core.config import ConfigError, check
from peftlab.core.model import adding_adapter, attach_adapter, set_adapter
from peftlab.core.state import adapter_configs, saved_modules
from peftlab.core.weights import dense_weight
from peftlab.methods._lora_init import RESIDUAL_INITS
from peftlab.methods.dora import DoRAConfig, DoRALinear
from peftlab.methods.lora import LoRAConfig, LoRALinear

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_DENSE = ("ties", "dare_linear", "dare_ties")
_DENSITY = _DENSE
_RANK = ("svd", *_DENSE)


@dataclasses.dataclass(frozen=True)
class CombineResult:
    """What :func:`combine` added."""

    name: str
    """The new adapter's name (now the active adapter)."""
    method: str
    rank: int
    """The new adapter's r."""
    relative_error: float
    """Largest over the layers of ‖target − stored‖_F / ‖target‖_F: 0 where exact."""


@dataclasses.dataclass
class _Part:
    name: str
    weight: float
    config: LoRAConfig


def combine(
    model: torch.nn.Module,
    weights: dict[str, float],
    method: str = "linear",
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    new_name: str | None = None,
    adapter_name: str | None = None,
) -> CombineResult:
    """Add adapter ``new_name``, the ``method`` combination of the named adapters on ``model``
    (see the module docstring for the maths), and make it the active adapter.

    Args:
        model: a model carrying the named LoRA, DoRA or QLoRA adapters.
        weights: adapter name → weight ``w_i`` (any finite number; negative subtracts).
        method: one of :data:`METHODS`.
        density: fraction of entries kept, in (0, 1] (``ties``, ``dare_*``; required there).
        rank: r of the result for ``svd``/``ties``/``dare_*`` (default ``Σ r_i``: exact for
            ``svd``).
        seed: the drop pattern of ``dare_*``.
        new_name: the new adapter's name (default ``"combined"``); ``adapter_name`` is the
            same option under the name ``apply`` uses.

    Raises:
        ConfigError: a refused input (one line naming the key, the value, what is allowed);
            the model is left exactly as it was.
    """
    name = _new_name(model, new_name, adapter_name)
    parts = _parts(model, weights)
    _check_options(method, density, rank, seed, parts)
    dora = isinstance(parts[0].config, DoRAConfig) or getattr(parts[0].config, "use_dora", False)
    layers = _layers(model, parts)
    r_new = _rank(method, rank, parts)
    config = _new_config(parts, layers, method, r_new)
    combine_layer = _layer_combiner(method, density, r_new, seed)
    with adding_adapter(model):
        results = {lname: combine_layer(layer, parts, config.scaling) for lname, layer in layers}
        if dora:
            for (lname, layer), res in zip(layers, results.values()):
                res.append(_magnitude(layer, parts, method, density, seed, lname))
        attach_adapter(model, config, name, resolve_head=False)
        held = {ln for ln, layer in _all_layers(model) if name in layer.lora_A}
        if held != {ln for ln, _ in layers}:
            raise ConfigError(
                f"target_modules={config.target_modules!r} of the combined adapter reach "
                f"{len(held)} layers, not the {len(layers)} its parts adapt"
            )
        _write(model, name, results)
        set_adapter(model, name)
    error = max((res[2] for res in results.values()), default=0.0)
    return CombineResult(name, method, r_new, float(error))


def _new_name(model, new_name: str | None, adapter_name: str | None) -> str:
    if new_name is not None and adapter_name is not None and new_name != adapter_name:
        raise ConfigError(
            f"new_name={new_name!r} and adapter_name={adapter_name!r} name the same thing; give one"
        )
    name = new_name if new_name is not None else adapter_name or "combined"
    check(isinstance(name, str) and name.isidentifier(), "new_name", name, "a Python identifier")
    if name in adapter_configs(model):
        raise ConfigError(
            f"new_name={name!r} is taken: the model already has an adapter of that name; "
            f"choose another new_name"
        )
    return name


def _parts(model, weights) -> list[_Part]:
    """The named parts with their configs, after every check on the names and weights."""
    check(
        isinstance(weights, dict) and len(weights) > 0,
        "weights",
        weights,
        "a non-empty dict {adapter name: weight}",
    )
    configs = adapter_configs(model)
    parts = []
    for n, w in weights.items():
        if n not in configs:
            raise ConfigError(f"no adapter named {n!r} on the model; it has {sorted(configs)}")
        ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
        check(ok, f"weights[{n!r}]", w, "a finite number")
        cfg = configs[n]
        if not isinstance(cfg, LoRAConfig):
            raise ConfigError(
                f"adapter {n!r} is {cfg.method!r}; combine takes LoRA-family adapters "
                f"(lora, dora, qlora)"
            )
        if saved_modules(model, n):
            raise ConfigError(
                f"adapter {n!r} trains {list(saved_modules(model, n))} in full "
                f"(modules_to_save), its own copy of them; combine merges low-rank factors "
                f"only (give the parts modules_to_save=[])"
            )
        if cfg.init in RESIDUAL_INITS:
            raise ConfigError(
                f"adapter {n!r} (init {cfg.init!r}) holds part of the base weights; save it "
                f"with conventional=True, load that, and combine it"
            )
        if cfg.rank_pattern or cfg.alpha_pattern:
            raise ConfigError(
                f"adapter {n!r} has per-module ranks or alphas (rank_pattern/alpha_pattern); "
                f"combine takes adapters with one rank and scale for every module"
            )
        parts.append(_Part(n, float(w), cfg))
    kinds = {(p.config.method, _is_dora(p.config)) for p in parts}
    if len(kinds) > 1:
        desc = sorted(f"{p.name}: {p.config.method}{'+dora' * _is_dora(p.config)}" for p in parts)
        raise ConfigError(f"adapters of different methods cannot be combined ({', '.join(desc)})")
    return parts


def _is_dora(config: LoRAConfig) -> bool:
    return isinstance(config, DoRAConfig) or bool(getattr(config, "use_dora", False))


def _check_options(method, density, rank, seed, parts: list[_Part]) -> None:
    check(method in METHODS, "method", method, f"one of {', '.join(METHODS)}")
    if method in _DENSITY:
        ok = isinstance(density, int | float) and not isinstance(density, bool)
        check(ok and 0 < density <= 1, "density", density, f"in (0, 1] for method={method!r}")
    elif density is not None:
        raise ConfigError(
            f"density={density!r} is only used by {', '.join(_DENSITY)}; method={method!r} "
            f"keeps every entry"
        )
    if rank is not None:
        if method not in _RANK:
            raise ConfigError(
                f"rank={rank!r} is only used by {', '.join(_RANK)}; method={method!r} keeps "
                f"the parts' rank ({'theirs' if method == 'linear' else 'their sum'})"
            )
        ok = isinstance(rank, int) and not isinstance(rank, bool)
        check(ok and rank >= 1, "rank", rank, "an integer >= 1")
    check(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an integer")
    if method == "linear":
        ranks = {p.name: p.config.r for p in parts}
        if len(set(ranks.values())) > 1:
            raise ConfigError(
                f"method='linear' sums the factors, which needs one rank; the ranks are "
                f"{ranks}: use method='cat' (exact) or 'svd'"
            )


def _all_layers(model) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _layers(model, parts: list[_Part]) -> list[tuple[str, LoRALinear]]:
    """The layers holding at least one part, in model order."""
    out = [(n, m) for n, m in _all_layers(model) if any(p.name in m.lora_A for p in parts)]
    if not out:
        raise ConfigError(f"adapters {[p.name for p in parts]} adapt no layer of the model")
    return out


def _rank(method: str, rank: int | None, parts: list[_Part]) -> int:
    if method == "linear":
        return parts[0].config.r
    if method == "cat" or rank is None:
        return sum(p.config.r for p in parts)
    return rank


def _new_config(parts: list[_Part], layers, method: str, r: int) -> LoRAConfig:
    """The first part's config with the new rank and target modules; scaling 1 except for
    ``linear``, which keeps the parts' rank and the first part's scaling."""
    first = parts[0].config
    same = all(p.config.target_modules == first.target_modules for p in parts)
    targets = first.target_modules if same else [n for n, _ in layers]
    changes = {"target_modules": targets, "modules_to_save": []}
    if method != "linear":
        changes.update(r=r, alpha=float(r), use_rslora=False)
    return first.replace(**changes)


# -- per layer: each combiner returns [A, B, relative error] in float64 ---------------------
def _factors(layer: LoRALinear, parts: list[_Part]):
    """(A_i, B_i, s_i, w_i) of the parts present on ``layer``, in float64."""
    return [
        (
            layer.lora_A[p.name].weight.detach().double(),
            layer.lora_B[p.name].weight.detach().double(),
            layer.scaling[p.name],
            p.weight,
        )
        for p in parts
        if p.name in layer.lora_A
    ]


def _linear(layer: LoRALinear, parts: list[_Part], s_new: float) -> list:
    f = _factors(layer, parts)
    if all(torch.equal(a, f[0][0]) for a, _, _, _ in f):
        return [f[0][0], sum(w * s / s_new * b for _, b, s, w in f), 0.0]
    if all(torch.equal(b, f[0][1]) for _, b, _, _ in f):
        return [sum(w * s / s_new * a for a, _, s, w in f), f[0][1], 0.0]
    names = [p.name for p in parts if p.name in layer.lora_A]
    raise ConfigError(
        f"method='linear' is not exact here: adapters {names} differ in both A and B on a "
        f"layer, so a weighted sum of factors adds cross terms B_i·A_j; use method='cat' "
        f"(exact, rank {sum(p.config.r for p in parts)}) or 'svd'"
    )


def _cat(layer: LoRALinear, parts: list[_Part], s_new: float = 1.0) -> list:
    """Every part's rank slot, zeros where a part is absent, so the rank is the same on
    every layer."""
    A, B = [], []
    dev, f64 = layer.base_layer.weight.device, torch.float64
    for p in parts:
        if p.name in layer.lora_A:
            A.append(layer.lora_A[p.name].weight.detach().to(dev, f64))
            b = layer.lora_B[p.name].weight.detach().to(dev, f64)
            B.append(p.weight * layer.scaling[p.name] * b)
        else:
            A.append(torch.zeros(p.config.r, layer.in_features, dtype=f64, device=dev))
            B.append(torch.zeros(layer.out_features, p.config.r, dtype=f64, device=dev))
    return [torch.cat(A, 0), torch.cat(B, 1), 0.0]


def _truncate(u, s, vh, k: int) -> list:
    """``[A, B, error]`` of the rank-``k`` truncation of ``U·diag(s)·Vh`` (zero-padded to k)."""
    total = s.pow(2).sum()
    kept = min(k, s.numel())
    error = (s[kept:].pow(2).sum() / total).sqrt().item() if total > 0 else 0.0
    root = s[:kept].sqrt()
    A = torch.zeros(k, vh.shape[1], dtype=vh.dtype, device=vh.device)
    B = torch.zeros(u.shape[0], k, dtype=u.dtype, device=u.device)
    A[:kept] = root[:, None] * vh[:kept]
    B[:, :kept] = u[:, :kept] * root[None, :]
    return [A, B, error]


def _svd_of_factors(A, B, k: int) -> list:
    """Truncated SVD of ``B·A`` without forming it: ``B = Qb·Rb``, ``Aᵀ = Qa·Ra``, then the
    SVD of the small ``Rb·Raᵀ``."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _truncate(qb @ u, s, vh @ qa.T, k)


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``⌈density·n⌉`` largest-magnitude entries set to 0."""
    k = math.ceil(density * t.numel())
    if k >= t.numel():
        return t
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[t.abs().flatten().topk(k).indices] = True
    return t * keep.view(t.shape)


def _drop(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by ``1/density``."""
    keep = torch.rand(t.shape, generator=gen, dtype=torch.float64) < density
    return t * keep.to(t.device) / density


def _disjoint_mean(ts: list[torch.Tensor]) -> torch.Tensor:
    """TIES' elect + disjoint merge: per entry, the mean of the tensors whose sign agrees
    with the sign of their sum."""
    stack = torch.stack(ts)
    agree = (stack.sign() == stack.sum(0).sign()) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def _merge_tensors(ts: list, weights: list, method: str, density, gen) -> torch.Tensor:
    """The ``method`` combination of task tensors ``ts`` with ``weights``."""
    if method == "ties":
        return _disjoint_mean([w * _trim(t, density) for t, w in zip(ts, weights)])
    if method in ("dare_linear", "dare_ties"):
        dropped = [w * _drop(t, density, gen) for t, w in zip(ts, weights)]
        return sum(dropped) if method == "dare_linear" else _disjoint_mean(dropped)
    return sum(w * t for t, w in zip(ts, weights))


def _layer_combiner(method: str, density, rank: int, seed: int) -> Callable:
    """``(layer, parts, s_new) → [A, B, error]`` for ``method``."""
    if method == "linear":
        return _linear
    if method == "cat":
        return _cat
    if method == "svd":
        return lambda layer, parts, s: _svd_of_factors(*_cat(layer, parts)[:2], rank)
    gen = torch.Generator().manual_seed(seed)  # one stream, drawn in layer then part order

    def dense(layer: LoRALinear, parts: list[_Part], s_new: float) -> list:
        f = _factors(layer, parts)
        merged = _merge_tensors(
            [s * b @ a for a, b, s, _ in f], [w for *_, w in f], method, density, gen
        )
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        return _truncate(u, s, vh, rank)

    return dense


def _magnitude(layer, parts: list[_Part], method: str, density, seed: int, lname: str):
    """DoRA's magnitude of the combination: ``m0 + combine_i(w_i, m_i − m0)``."""
    if not isinstance(layer, DoRALinear):
        raise ConfigError(f"{lname} holds no DoRA magnitude; it is a {type(layer).__name__}")
    m0 = dense_weight(layer.base_layer).detach().double().norm(dim=1)
    present = [p for p in parts if p.name in layer.lora_A]
    ts = [layer.lora_magnitude_vector[p.name].detach().double() - m0 for p in present]
    # The magnitude's drop pattern has its own stream, so the factors' pattern is that of LoRA.
    gen = torch.Generator().manual_seed(seed + 1)
    return m0 + _merge_tensors(ts, [p.weight for p in present], method, density, gen)


@torch.no_grad()
def _write(model, name: str, results: dict[str, list]) -> None:
    """Copy the combined factors (and magnitudes) into the new adapter's parameters."""
    for lname, res in results.items():
        layer = model.get_submodule(lname)
        for key, value in (("lora_A", res[0]), ("lora_B", res[1])):
            p = getattr(layer, key)[name].weight
            p.copy_(value.to(device=p.device, dtype=p.dtype))
        if len(res) > 3:
            m = layer.lora_magnitude_vector[name]
            m.copy_(res[3].to(device=m.device, dtype=m.dtype))
