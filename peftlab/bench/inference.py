"""Inference timing of a comparison run: prefill latency and decode throughput of the adapted
model against a fresh copy of the base model, timed in the same rounds on the same prompts.

- **Prefill**: seconds of one forward over the prompts.
- **Decode**: greedy ``generate`` of ``new_tokens`` minus ``generate`` of 1 token, so prompt
  processing cancels out; tokens/s is ``batch × (new_tokens − 1)`` over that difference.
- **Overhead ratios**: prefill latency ratio (> 1 slower) and decode speed ratio (< 1 slower)
  against the base model; the claims turn them into one slowdown
  (:func:`peftlab.bench.claims.overhead_fraction`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def time_inference(
    models: dict[str, nn.Module], batch: dict, new_tokens: int = 16, repeats: int = 3
) -> dict:
    """Prefill latency and decode throughput of each model on ``batch`` (tokenized prompts).

    The models are timed in turn within each of ``repeats`` rounds (after one warm-up round)
    and each figure is the median over rounds, so a load change on a shared machine hits all
    of them alike instead of whichever happened to run then.

    Prefill: seconds of one forward over the prompts. Decode: greedy ``generate`` of
    ``new_tokens`` minus ``generate`` of 1 token, so prompt processing cancels out; tokens/s is
    ``batch × (new_tokens − 1)`` over that difference. Models without ``generate`` (encoders
    with a classification head) report prefill only.

    Returns:
        name → ``{"prefill_s", "decode_tokens_per_s", "rounds"}`` (``rounds``: each round's
        ``[prefill_s, decode_tokens_per_s]``, the spread the noise floor reads).
    """
    rows = batch["input_ids"].shape[0]
    states = {name: m.training for name, m in models.items()}

    def gen(model: nn.Module, n: int):
        pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
        return model.generate(
            **batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
        )

    def one_round(model: nn.Module) -> tuple[float, float | None]:
        t0 = time.perf_counter()
        model(**batch)
        prefill = time.perf_counter() - t0
        if new_tokens <= 1 or not getattr(model, "can_generate", lambda: False)():
            return prefill, None
        t0 = time.perf_counter()
        gen(model, new_tokens)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen(model, 1)
        t_one = time.perf_counter() - t0
        return prefill, rows * (new_tokens - 1) / max(t_full - t_one, 1e-9)

    try:
        for m in models.values():
            m.eval()
            one_round(m)  # warm-up: first calls pay for allocation and lazy init
        times: dict[str, list] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                times[name].append(one_round(m))
    finally:
        for name, m in models.items():
            m.train(states[name])
    out = {}
    for name, ts in times.items():
        decode = [d for _, d in ts if d is not None]
        out[name] = {
            "prefill_s": statistics.median(p for p, _ in ts),
            "decode_tokens_per_s": statistics.median(decode) if decode else None,
            "rounds": [[p, d] for p, d in ts],  # each round's (prefill s, decode tok/s)
        }
    return out


def overhead_ratios(base: dict, other: dict | None) -> dict | None:
    """``other`` relative to ``base``: prefill latency ratio (>1 slower), decode speed ratio (<1 slower)."""
    if other is None:
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "prefill_latency_ratio": ratio(other["prefill_s"], base["prefill_s"]),
        "decode_speed_ratio": ratio(
            other.get("decode_tokens_per_s"), base.get("decode_tokens_per_s")
        ),
    }
