"""Intervals and verdicts of compare: identical configurations are not separated, a clearly
worse one is, and timing inside the noise floor is never a finding."""

from __future__ import annotations

import doctest
import math
import random

import pytest

from peftlab.bench import stats


def test_t_quantiles_match_reference_values():
    # Reference values of t(0.975, df) (standard tables).
    for df, t in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert stats.t_quantile(df) == pytest.approx(t, abs=1e-3)
    assert stats.t_quantile(1000) == pytest.approx(1.962, abs=2e-3)
    with pytest.raises(ValueError):
        stats.t_quantile(0.5)


def test_interval_is_the_t_interval_and_needs_two_values():
    iv = stats.interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6)
    one = stats.interval([0.5])
    assert one.half_width is None and "no interval" in one.format()
    assert stats.interval([]) is None
    assert stats.interval([float("nan"), 1.0, 3.0]).n == 2  # non-finite values are left out


def _seeds(mean, spread, n=3, seed=0):
    rng = random.Random(seed)
    return [mean + rng.uniform(-spread, spread) for _ in range(n)]


def test_identical_configurations_are_not_separated():
    # The same configuration run twice differs only by noise: never a verdict.
    for seed in range(20):
        a, b = _seeds(0.8, 0.02, seed=seed), _seeds(0.8, 0.02, seed=seed + 100)
        d = stats.difference(a, b)
        if d.separated:  # a 95% interval misses now and then; never by much
            assert abs(d.delta) < 0.04
    same = [0.81, 0.82, 0.80]
    assert not stats.difference(same, list(same)).separated
    assert "not separated" in stats.verdict("a", same, "b", list(same))


def test_a_clearly_worse_configuration_is_separated():
    good = [0.84, 0.86, 0.85]
    lr0 = [0.51, 0.50, 0.52]  # e.g. lr 0: the majority class
    d = stats.difference(good, lr0)
    assert d.paired and d.separated and d.delta > 0.3
    assert stats.verdict("lora", good, "lr0", lr0).startswith("lora vs lr0: lora is better")
    assert "lr0 is better" in stats.verdict("lora", good, "lr0", lr0, higher_is_better=False)


def test_one_seed_is_never_separated():
    d = stats.difference([0.9], [0.1])
    assert not d.separated and d.half_width is None


def test_unpaired_welch_interval():
    d = stats.difference([1.0, 1.1, 0.9, 1.0], [2.0, 2.1], paired=None)
    assert not d.paired and d.separated and d.delta == pytest.approx(-1.05)


def test_timing_inside_noise_is_not_a_finding():
    noise = stats.noise_floor([1.03, 0.98])
    assert noise == pytest.approx(0.03)
    assert stats.timing_verdict(1.02, noise)["finding"] == "within noise"
    assert stats.timing_verdict(1.5, noise)["finding"] == "slower"
    assert stats.timing_verdict(0.6, noise)["finding"] == "faster"
    # A merged adapter computes what the base computes: never "faster".
    assert stats.timing_verdict(0.6, noise, can_be_faster=False)["finding"] == "within noise"
    assert stats.noise_floor([]) == 0.02


def test_doctests():
    assert doctest.testmod(stats).failed == 0
