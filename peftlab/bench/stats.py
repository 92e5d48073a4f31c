"""Uncertainty for compare: intervals over seeds, and verdicts only where the data separate.

Every number a comparison reports as a finding is a mean over ``n`` runs (seeds) with a 95%
interval, and two methods are called different only when the data say so:

- **Interval** — Student's t: ``mean ± t(0.975, n−1) · s / √n`` with ``s`` the sample standard
  deviation. With one run there is no interval (``half_width`` is None) and nothing is
  separated.
- **Paired comparison** (same seeds on both sides, as compare runs them): the per-seed
  differences ``d_i = a_i − b_i``; the two are *separated* when the t-interval of the mean
  difference excludes 0. Pairing removes what the seed does to both (data order, init), so it
  separates smaller differences than two independent intervals would.
- **Unpaired** (different seeds or counts): Welch's interval for ``mean(a) − mean(b)`` with
  the Welch–Satterthwaite degrees of freedom.
- **Timing** — a latency or speed ratio against the base model is a finding only when it lies
  beyond the *noise floor* measured in the same run (the base model timed against itself):
  ``|ratio − 1| > noise``. Inside it the report says "within noise (±x%)", and a method whose
  computation cannot be cheaper than its base (a merged adapter, merged full fine-tuning) is
  never reported as faster than the base: :func:`timing_verdict`.

The t quantiles are tabulated (df 1–30, exact to 3 decimals) and interpolated in ``1/df``
towards the normal quantile 1.960 beyond; no statistics package is needed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

# t(0.975, df) for df = 1..30.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip
_Z975 = 1.960


def t_quantile(df: float) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df >= 30:  # interpolate in 1/df between t(30) and the normal quantile
        w = 30.0 / df
        return _Z975 + (_T975[29] - _Z975) * w
    lo = int(math.floor(df))
    if lo == df:
        return _T975[lo - 1]
    frac = (1 / lo - 1 / df) / (1 / lo - 1 / (lo + 1))
    return _T975[lo - 1] + (_T975[lo] - _T975[lo - 1]) * frac


@dataclasses.dataclass(frozen=True)
class Interval:
    """``mean ± half_width`` (95%) over ``n`` values; ``half_width`` None when ``n`` < 2."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def format(self, fmt: str = ".3f", scale: float = 1.0, unit: str = "") -> str:
        """``0.853 ± 0.012 (n=3)``, or ``0.853 (n=1, no interval)``."""
        m = format(self.mean * scale, fmt) + unit
        if self.half_width is None:
            return f"{m} (n={self.n}, no interval)"
        return f"{m} ± {format(self.half_width * scale, fmt)}{unit} (n={self.n})"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.half_width, "n": self.n}


def interval(values: Sequence[float]) -> Interval | None:
    """The 95% t-interval of the mean of the finite ``values``; None when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    if len(xs) == 1:
        return Interval(xs[0], None, 1)
    sd = statistics.stdev(xs)
    return Interval(
        statistics.fmean(xs), t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs)), len(xs)
    )


@dataclasses.dataclass(frozen=True)
class Difference:
    """``mean(a) − mean(b)`` with its 95% interval, and whether the interval excludes 0."""

    delta: float
    half_width: float | None
    n: int
    paired: bool

    @property
    def separated(self) -> bool:
        return self.half_width is not None and abs(self.delta) > self.half_width

    def to_dict(self) -> dict:
        return {
            "delta": self.delta,
            "ci95": self.half_width,
            "n": self.n,
            "paired": self.paired,
            "separated": self.separated,
        }


def difference(a: Sequence[float], b: Sequence[float], paired: bool | None = None) -> Difference:
    """The difference of the means of ``a`` and ``b``.

    ``paired`` (default: when both have the same length ≥ 2) pairs ``a[i]`` with ``b[i]`` — the
    same seed on both sides. Otherwise Welch's interval. With fewer than two values on a side
    (paired: fewer than two pairs) the interval is None and the two are not separated.
    """
    xa = [float(v) for v in a]
    xb = [float(v) for v in b]
    if not xa or not xb:
        raise ValueError("difference() needs at least one value on each side")
    if paired is None:
        paired = len(xa) == len(xb) and len(xa) >= 2
    if paired:
        if len(xa) != len(xb):
            raise ValueError(f"paired values need equal counts, got {len(xa)} and {len(xb)}")
        iv = interval([x - y for x, y in zip(xa, xb)])
        assert iv is not None
        return Difference(iv.mean, iv.half_width, iv.n, True)
    delta = statistics.fmean(xa) - statistics.fmean(xb)
    if len(xa) < 2 or len(xb) < 2:
        return Difference(delta, None, min(len(xa), len(xb)), False)
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, 0.0, min(len(xa), len(xb)), False)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    return Difference(delta, t_quantile(max(1.0, df)) * se, min(len(xa), len(xb)), False)


def verdict(
    name_a: str, a: Sequence[float], name_b: str, b: Sequence[float], higher_is_better=True
):
    """One sentence: which of two methods is better on a metric, or "not separated".

    >>> verdict("lora", [0.81, 0.82, 0.80], "lora-copy", [0.80, 0.83, 0.81])
    'lora vs lora-copy: not separated (Δ = -0.003 ± 0.029, paired, n=3)'
    """
    d = difference(a, b)
    hw = "no interval" if d.half_width is None else f"± {d.half_width:.3f}"
    how = f"Δ = {d.delta:+.3f} {hw}, {'paired' if d.paired else 'unpaired'}, n={d.n}"
    if not d.separated:
        return f"{name_a} vs {name_b}: not separated ({how})"
    better = name_a if (d.delta > 0) == higher_is_better else name_b
    return f"{name_a} vs {name_b}: {better} is better ({how})"


def noise_floor(reference_ratios: Sequence[float], minimum: float = 0.02) -> float:
    """The timing noise floor of a run: the largest ``|r − 1|`` among ratios of the reference
    timed against itself (e.g. the base model's prefill latency measured in two phases), and
    never below ``minimum`` (a timer's resolution and cache effects)."""
    rs = [abs(float(r) - 1.0) for r in reference_ratios if r is not None and math.isfinite(r)]
    return max([minimum, *rs])


def timing_verdict(ratio: float | None, noise: float, can_be_faster: bool = True) -> dict:
    """Classify a slowdown ratio (method time / base time; > 1 is slower) against ``noise``.

    Returns ``{"ratio", "noise", "finding"}`` where ``finding`` is "slower", "faster" or
    "within noise". ``can_be_faster=False`` (a merged adapter computes exactly what the base
    computes) turns an apparent speed-up into "within noise": the measurement, not the method,
    produced it.
    """
    if ratio is None or not math.isfinite(ratio):
        return {"ratio": ratio, "noise": noise, "finding": "not measured"}
    if ratio - 1.0 > noise:
        finding = "slower"
    elif 1.0 - ratio > noise and can_be_faster:
        finding = "faster"
    else:
        finding = "within noise"
    return {"ratio": ratio, "noise": noise, "finding": finding}
