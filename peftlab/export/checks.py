"""Verification: the reloaded export against base + adapter, on the same prompts.

For each prompt (token ids from the base model's tokenizer) the reference — the base model
with the adapter applied, unmerged, in float32, i.e. what was trained — continues greedily for
``new_tokens`` tokens. Both models then score the prompt + that continuation, and

    max_rel_logit_diff = max over prompts of  max|L_export − L_ref| / max|L_ref|
    top1_agreement     = share of scored positions where argmax L_export = argmax L_ref
    greedy_agreement   = mean over prompts of (leading tokens of the export's own greedy
                         continuation equal to the reference's) / new_tokens
    greedy_identical   = share of prompts whose two greedy continuations are identical

``tokenizer_agreement`` (share of prompts the export's own tokenizer encodes to the same ids)
is reported for formats that carry a tokenizer.

Tolerances, by the precision of the export (measured on SmolLM2-135M + LoRA, docs/export.md):

=========  =====================  ================  =========================================
precision  max_rel_logit_diff ≤   top1_agreement ≥  why
=========  =====================  ================  =========================================
f32        1e-4                   0.99              a merge is exact up to float32 rounding
f16        5e-2                   0.95              10-bit mantissa on weights and activations
bf16       2.5e-1                 0.90              7-bit mantissa; hf bf16 computes in bf16
q8_0       —                      0.90              8-bit blocks of 32; judged on top-1 only
=========  =====================  ================  =========================================

An export outside its tolerance raises :class:`~peftlab.export.errors.ExportVerificationError`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from peftlab.export.errors import ExportVerificationError


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The bounds an export of one precision must stay within."""

    max_rel_logit_diff: float | None
    """Largest allowed max|ΔL|/max|L_ref| (None: not judged)."""
    min_top1_agreement: float


TOLERANCES = {
    "f32": Tolerance(1e-4, 0.99),
    "f16": Tolerance(5e-2, 0.95),
    "bf16": Tolerance(2.5e-1, 0.90),
    "q8_0": Tolerance(None, 0.90),
}

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Translate to French: Good morning, how are you?",
    "List three benefits of regular exercise:",
    "Q: What is 12 plus 30?\nA:",
    "The quick brown fox",
    "In machine learning, overfitting means",
    "Sort these numbers: 9 4 7 1 3 ->",
    "My favourite season is autumn because",
    "import numpy as np\nx = np.",
    "Dear customer, thank you for",
    "The opposite of hot is",
    "Write a haiku about the sea:",
)


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt; the chat template is not applied (the logits are compared,
    not the answers)."""
    ids = [tokenizer(p).input_ids for p in prompts]
    return [i for i in ids if i]


def _cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes the KV cache (transformers ≥ 5.2x: ``cache``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` (no end-of-sequence stop: both models run as long)."""
    key = _cache_kwarg(model)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=torch.tensor([[new[-1]]]), use_cache=True, **{key: cache})
        new.append(int(out.logits[0, -1].argmax()))
    return new


@torch.no_grad()
def _logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def compare(
    reference: nn.Module, candidate: nn.Module, ids: list[list[int]], new_tokens: int = 16
) -> dict:
    """The figures above for ``candidate`` against ``reference`` (both causal LMs)."""
    rel, agree, scored, greedy_frac, identical = 0.0, 0, 0, 0.0, 0
    for prompt in ids:
        ref_cont = greedy(reference, prompt, new_tokens) if new_tokens else []
        seq = prompt + ref_cont
        lr, lc = _logits(reference, seq), _logits(candidate, seq)
        rel = max(rel, ((lc - lr).abs().max() / lr.abs().max().clamp_min(1e-30)).item())
        agree += int((lc.argmax(-1) == lr.argmax(-1)).sum())
        scored += lr.shape[0]
        if new_tokens:
            cont = greedy(candidate, prompt, new_tokens)
            same = next((i for i, (a, b) in enumerate(zip(cont, ref_cont)) if a != b), new_tokens)
            greedy_frac += same / new_tokens
            identical += int(same == new_tokens)
    n = max(1, len(ids))
    return {
        "prompts": len(ids),
        "positions": scored,
        "max_rel_logit_diff": rel,
        "top1_agreement": agree / max(1, scored),
        "greedy_agreement": greedy_frac / n if new_tokens else None,
        "greedy_identical": identical / n if new_tokens else None,
    }


def tokenizer_agreement(source_tok, export_tok, prompts: list[str]) -> float:
    same = sum(source_tok(p).input_ids == export_tok(p).input_ids for p in prompts)
    return same / max(1, len(prompts))


def judge(name: str, figures: dict, precision: str, tokenizer_judged: bool = True) -> dict:
    """``figures`` with the tolerance and ``passed``; raises when outside tolerance. A
    tokenizer that encodes any prompt differently fails too (when ``tokenizer_judged``)."""
    tol = TOLERANCES[precision]
    failures = []
    agreement = figures.get("tokenizer_agreement")
    if tokenizer_judged and agreement is not None and agreement < 1:
        failures.append(
            f"the export's tokenizer encodes {1 - agreement:.0%} of the prompts differently"
        )
    if (
        tol.max_rel_logit_diff is not None
        and figures["max_rel_logit_diff"] > tol.max_rel_logit_diff
    ):
        failures.append(
            f"max relative logit difference {figures['max_rel_logit_diff']:.3g} > "
            f"{tol.max_rel_logit_diff:g}"
        )
    if figures["top1_agreement"] < tol.min_top1_agreement:
        failures.append(
            f"top-1 agreement {figures['top1_agreement']:.3f} < {tol.min_top1_agreement:g}"
        )
    result = {
        "check": name,
        **figures,
        "precision": precision,
        "tolerance": dataclasses.asdict(tol),
        "judged": True,
        "passed": not failures,
    }
    if failures:
        raise ExportVerificationError(
            f"export verification failed ({name}, {precision}): {'; '.join(failures)} against "
            f"base + adapter on {figures['prompts']} prompts — the export does not compute "
            f"what was trained"
        ).with_report(result)
    return result
