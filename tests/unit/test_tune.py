"""Successive halving: finds the best candidate of a known landscape within ~R× one run's
budget, records every trial, survives failing candidates, and refuses bad grids clearly."""

from __future__ import annotations

import math

import pytest

from peftlab.bench import tune
from peftlab.core.config import ConfigError


def landscape(cand, steps):
    # Validation accuracy peaks at lr 1e-3; more steps help every candidate equally.
    return 1.0 - abs(math.log10(cand["lr"]) + 3) * 0.2 + 0.001 * steps


def test_grid_and_its_errors():
    space = {"lr": [1e-4, 1e-3], "r": [8, 16]}
    assert tune.grid(space, ["lr", "r"], "lora") == [
        {"lr": 1e-4, "r": 8}, {"lr": 1e-4, "r": 16}, {"lr": 1e-3, "r": 8}, {"lr": 1e-3, "r": 16},
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="no grid for 'alpha'.*tunable keys are \\['lr', 'r'\\]"):
        tune.grid(space, ["alpha"], "lora")
    with pytest.raises(ConfigError, match="empty grid"):
        tune.grid({"lr": []}, ["lr"], "lora")
    with pytest.raises(ConfigError, match="at least one key"):
        tune.grid(space, [], "lora")


def test_rung_budgets():
    assert tune.rung_steps(4, 40) == [10, 20]
    assert tune.rung_steps(8, 40) == [5, 10, 20]
    assert tune.rung_steps(1, 40) == []
    assert tune.rung_steps(8, 4, min_steps=2) == [2, 2, 2]


def test_successive_halving_finds_the_peak_within_budget():
    cands = [{"lr": lr} for lr in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 3e-1, 3e-3, 3e-5)]
    calls = []
    res = tune.successive_halving(cands, 40, lambda c, s: calls.append(s) or landscape(c, s))
    assert res.best == {"lr": 1e-3} and res.error is None
    # 8 candidates: 3 rungs (8×5 + 4×10 + 2×20 = 120 steps = 3 full runs), never the 8×40 grid.
    assert sum(calls) == 120 and len(res.trials) == 14
    assert [t.rung for t in res.trials].count(2) == 2
    assert sum(t.kept for t in res.trials if t.rung == 0) == 4


def test_failing_candidates_are_recorded_and_dropped():
    def score(c, s):
        if c["lr"] > 1e-2:
            raise RuntimeError("diverged")
        return float("nan") if c["lr"] == 1e-5 else landscape(c, s)

    res = tune.successive_halving([{"lr": x} for x in (1e-5, 1e-3, 1e-1, 5e-1)], 8, score)
    assert res.best == {"lr": 1e-3}
    errors = [t.error for t in res.trials if t.error]
    assert any("diverged" in e for e in errors) and any("validation score nan" in e for e in errors)


def test_every_candidate_failing_is_an_error_not_a_choice():
    res = tune.successive_halving([{"lr": 1}, {"lr": 2}], 8, lambda c, s: 1 / 0)
    assert res.best is None and "every candidate failed" in res.error
    assert res.to_dict()["trials"][0]["error"].startswith("ZeroDivisionError")


def test_every_method_declares_a_prior_and_searchable_keys():
    import dataclasses

    import peftlab
    from peftlab.core.registry import get_method

    for name in peftlab.methods():
        spec = get_method(name)
        assert spec.tuning is not None, f"{name} declares no learning-rate prior"
        assert "lr" in spec.tuning.grid and spec.tuning.lr > 0
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        for key in spec.tuning.grid:
            assert key == "lr" or key in fields, f"{name}: grid key {key!r} is not an option"
            if key != "lr":  # every candidate value is a valid config for the method
                for v in spec.tuning.grid[key]:
                    spec.config_cls(**{key: v})
    # The priors differ by family: never one shared number.
    lrs = {get_method(m).tuning.lr for m in ("lora", "prefix", "full")}
    assert len(lrs) == 3


def test_an_edge_winner_tries_past_the_grid_edge_and_stops_when_worse():
    from peftlab.bench.search import lr_beyond

    peak = lambda c, s: -abs(math.log10(c["lr"]) - math.log10(8e-3))  # noqa: E731
    grid = [{"lr": lr} for lr in (1e-4, 3e-4, 1e-3, 2e-3)]
    search = type("S", (), {"candidates": grid})()
    res = tune.successive_halving(grid, 16, lambda c, s: peak(c, s), beyond=lr_beyond(search))
    past = [t for t in res.trials if t.beyond_grid]
    # 2e-3 wins the grid; 4e-3 then 8e-3 are tried (×2, the ratio of the top two) and win.
    assert [t.candidate["lr"] for t in past] == [4e-3, 8e-3] and res.best == {"lr": 8e-3}
    assert all(t.steps == 8 and t.rung == 1 for t in past)  # the last rung's budget
    assert [t.candidate for t in res.trials if t.kept and t.rung == 1] == [{"lr": 8e-3}]
    # At most max_beyond steps, and a worse one past the edge stops the walk at once.
    low = lambda c, s: -abs(math.log10(c["lr"]) - math.log10(5e-5))  # noqa: E731
    res = tune.successive_halving(grid, 16, low, beyond=lr_beyond(search))
    assert [t.candidate["lr"] for t in res.trials if t.beyond_grid] == [3.33e-05, 1.11e-05]
    assert res.best == {"lr": 3.33e-05}
    inner = lambda c, s: -abs(math.log10(c["lr"]) - math.log10(5e-4))  # noqa: E731
    res = tune.successive_halving(grid, 16, inner, beyond=lr_beyond(search))
    assert not any(t.beyond_grid for t in res.trials) and res.best == {"lr": 3e-4}
