"""Which timings of a comparison run are findings, and which are noise or a busy machine.

- **Slowdown** of a form (unmerged or merged) against the base model timed in the same phase
  on the same prompts: ``s = max(prefill latency ratio, 1 / decode speed ratio)``; the
  overhead is ``s − 1``.
- **Noise floor** of a run: what the timer and the machine do to a model that did not change
  (:func:`peftlab.bench.stats.noise_floor`, the largest ``|r − 1|``). The worker times the
  base model in two phases (with the unmerged model, then with the merged one or alone): the
  base against itself, ``|prefill₂ / prefill₁ − 1|`` and ``|decode₁ / decode₂ − 1|``; and
  every model is timed in several rounds of a phase: each one's rounds against each other are
  the same kind of ratio. (With the phases alone, one quiet base pair could set a 9% floor
  while a merged model's two decode rounds disagreed by 40%: a "slower" verdict from noise.)
- **Finding** (:func:`peftlab.bench.stats.timing_verdict`): "slower" beyond the noise floor,
  "within noise" inside it, and "faster" only for a form whose computation could be cheaper
  than the base's — never for a merged adapter or for full fine-tuning, which compute exactly
  the base's operations with other numbers.
- **Reliability**: the machine's load (:func:`peftlab.bench.load.snapshot`) is read before
  the run, between its phases and after it; when any reading shows the machine loaded by other
  work, or the load changed between two readings, the run's timings (training speed and
  inference) are "unreliable (machine busy)" and are not stated as findings.
"""

from __future__ import annotations

from peftlab.bench import stats
from peftlab.bench.load import BUSY_THRESHOLD

UNRELIABLE = "unreliable (machine busy)"


def overhead_fraction(ratios: dict | None) -> float | None:
    """``max(prefill latency ratio, 1/decode speed ratio) − 1``; None when nothing was timed."""
    if not ratios:
        return None
    parts = [ratios.get("prefill_latency_ratio")]
    if ratios.get("decode_speed_ratio"):
        parts.append(1.0 / ratios["decode_speed_ratio"])
    parts = [p for p in parts if p is not None]
    return max(parts) - 1.0 if parts else None


def noise_floor(first: dict | None, second: dict | None, *timed: dict | None) -> float | None:
    """The noise floor from the base model's timings in two phases (``{"prefill_s",
    "decode_tokens_per_s"}`` each) and the round-to-round spread of those and of every other
    timing in ``timed`` (their ``"rounds"``); None when the base was timed only once."""
    if not first or not second:
        return None
    ratios = _pair_ratios(first, second)
    for t in (first, second, *timed):
        rounds = (t or {}).get("rounds") or []
        for a, b in zip(rounds, rounds[1:]):  # both ways: the slower round against the faster
            a, b = ({"prefill_s": r[0], "decode_tokens_per_s": r[1]} for r in (a, b))
            ratios += _pair_ratios(a, b) + _pair_ratios(b, a)
    return stats.noise_floor(ratios) if ratios else None


def _pair_ratios(first: dict, second: dict) -> list[float]:
    """An unchanged model timed twice: prefill latency and decode speed ratios."""
    ratios = []
    if first.get("prefill_s") and second.get("prefill_s"):
        ratios.append(second["prefill_s"] / first["prefill_s"])
    if first.get("decode_tokens_per_s") and second.get("decode_tokens_per_s"):
        ratios.append(first["decode_tokens_per_s"] / second["decode_tokens_per_s"])
    return ratios


def findings(
    unmerged: dict | None, merged: dict | None, noise: float | None, trains_base: bool
) -> dict:
    """Each timed form's :func:`~peftlab.bench.stats.timing_verdict` on its slowdown; a form
    with no noise floor measured gets the statistics' minimum floor."""
    floor = noise if noise is not None else stats.noise_floor([])
    out = {}
    for form, ratios in (("unmerged", unmerged), ("merged", merged)):
        if ratios is None:
            continue
        o = overhead_fraction(ratios)
        # Full fine-tuning (either form) and every merged adapter run the base's operations.
        can_be_faster = form == "unmerged" and not trains_base
        out[form] = stats.timing_verdict(None if o is None else 1.0 + o, floor, can_be_faster)
    return out


def reliability(loads: dict[str, dict]) -> dict:
    """``{"reliable", "why"}`` from the load readings of one run (name → ``Load.to_dict()``,
    in the order they were taken)."""
    readings = [(k, v) for k, v in loads.items() if isinstance(v, dict) and "loaded" in v]
    if not readings:
        return {"reliable": True, "why": "no load readings (result written before they existed)"}
    busy = [k for k, v in readings if v["loaded"]]
    if busy:
        worst = max(v.get("other_busy_cores", 0.0) for _, v in readings)
        return {
            "reliable": False,
            "why": f"{UNRELIABLE}: other work used up to {worst:.1f} cores ({', '.join(busy)})",
        }
    for (k0, a), (k1, b) in zip(readings, readings[1:]):
        if abs(a.get("other_busy_cores", 0.0) - b.get("other_busy_cores", 0.0)) >= BUSY_THRESHOLD:
            return {"reliable": False, "why": f"{UNRELIABLE}: the load changed from {k0} to {k1}"}
    return {"reliable": True, "why": "the machine was quiet at every reading"}


def legacy_reliability(load_average: list[float] | None, cpu_count: int | None) -> dict:
    """Reliability of a result written before load readings existed: its 1-minute load
    average at the end against the core count."""
    if not load_average or not cpu_count:
        return {"reliable": True, "why": "no load recorded"}
    if load_average[0] >= cpu_count:
        return {
            "reliable": False,
            "why": f"{UNRELIABLE}: load average {load_average[0]:.1f} on {cpu_count} cores",
        }
    return {"reliable": True, "why": f"load average {load_average[0]:.1f} on {cpu_count} cores"}
