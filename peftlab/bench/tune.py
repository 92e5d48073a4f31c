"""Per-method search inside compare: successive halving over a small grid.

A comparison ranks methods, not defaults, only when every method runs at its own good
setting. Each method declares a prior grid where it is registered (``MethodSpec.tuning``:
e.g. learning rates ``1e-4…2e-3`` for low-rank methods, ``1e-3…3e-2`` for virtual tokens,
``1e-5…1e-4`` for full fine-tuning); ``peftlab compare --tune lr[,r,...]`` searches the product
of the named keys' grids on the *validation* split, never the test split.

**Successive halving** (Jamieson & Talwalkar 2016, "Non-stochastic Best Arm Identification
and Hyperparameter Optimization", Alg. 1): with ``n`` candidates and a full budget of ``B``
steps, rung ``k`` trains the surviving ``⌈n/2^k⌉`` candidates for ``B/2^(R−k)`` steps each
(``R = ⌈log2 n⌉`` rungs before the last) and keeps the better half by validation score. The
last survivor is the chosen setting; it then runs at the full budget with every seed.
Searching costs ``Σ_k ⌈n/2^k⌉·B/2^(R−k) ≈ R·B`` before the final runs — about 2× one
run for 4 candidates, 3× for 8 — instead of ``n·B`` for the full grid.

A candidate that fails (an error, a non-finite score) is recorded with its error and
dropped; when every candidate fails the method fails with the first error, and the other
methods of the comparison go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peftlab.core.config import ConfigError


@dataclasses.dataclass
class Trial:
    """One candidate trained at one rung."""

    candidate: dict[str, Any]
    rung: int
    steps: int
    score: float | None = None
    error: str | None = None
    kept: bool = False
    beyond_grid: bool = False
    """A candidate past the grid's edge, tried because the edge won (:func:`successive_halving`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    best: dict[str, Any] | None
    trials: list[Trial]
    error: str | None = None
    """Why nothing was chosen (every candidate failed), or None."""

    def to_dict(self) -> dict:
        return {
            "best": self.best,
            "error": self.error,
            "trials": [t.to_dict() for t in self.trials],
        }


def grid(space: Mapping[str, Sequence[Any]], keys: Sequence[str], method: str) -> list[dict]:
    """The candidates: the product of ``space[k]`` over ``keys``.

    A key the method does not declare, or an empty grid, is a :class:`ConfigError` naming the
    method, the key and what it declares.
    """
    if not keys:
        raise ConfigError("--tune needs at least one key, e.g. --tune lr")
    for k in keys:
        if k not in space:
            raise ConfigError(
                f"--tune {k}: method {method!r} has no grid for {k!r}; its tunable keys are "
                f"{sorted(space) or 'none'}"
            )
        if not space[k]:
            raise ConfigError(f"--tune {k}: method {method!r} declares an empty grid for {k!r}")
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def rung_steps(n: int, budget: int, min_steps: int = 1) -> list[int]:
    """Steps per candidate at each rung for ``n`` candidates and a full budget of ``budget``
    steps: ``budget / 2^(R−k)`` for ``k = 0..R−1`` (``R = ⌈log2 n⌉``), at least ``min_steps``."""
    rungs = math.ceil(math.log2(n)) if n > 1 else 0
    return [max(min_steps, budget >> (rungs - k)) for k in range(rungs)]


def _scored(trial: Trial, score: Callable[[dict[str, Any], int], float]) -> float | None:
    """Score ``trial`` in place; None (and ``trial.error``) when it fails."""
    try:
        value = float(score(trial.candidate, trial.steps))
        if not math.isfinite(value):
            raise ValueError(f"validation score {value}")
    except Exception as e:  # one candidate failing must not end the search
        trial.error = f"{type(e).__name__}: {e}"
        return None
    trial.score = value
    return value


def successive_halving(
    candidates: Sequence[dict[str, Any]],
    budget: int,
    score: Callable[[dict[str, Any], int], float],
    min_steps: int = 1,
    beyond: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
    max_beyond: int = 2,
) -> SearchResult:
    """Search ``candidates`` with ``score(candidate, steps)`` (higher is better, measured on the
    validation split); returns the survivor and every trial.

    ``beyond(candidate)``: the next candidate past the grid's edge when ``candidate`` lies on
    it, else None. When the survivor is on an edge, that candidate trains at the last rung's
    steps and replaces the survivor if it scores higher, up to ``max_beyond`` times: a grid
    declared for one budget and model can be off for another, and an edge winner says the
    best setting may lie outside it. Each step costs one trial at the last rung."""
    alive = [dict(c) for c in candidates]
    trials: list[Trial] = []
    last: Trial | None = None
    for rung, steps in enumerate(rung_steps(len(alive), budget, min_steps)):
        scored: list[tuple[float, int, Trial]] = []
        for i, cand in enumerate(alive):
            trials.append(trial := Trial(cand, rung, steps))
            if (value := _scored(trial, score)) is not None:
                scored.append((value, i, trial))
        if not scored:
            break
        scored.sort(key=lambda t: (-t[0], t[1]))  # ties: the earlier (grid-order) candidate
        keep = scored[: max(1, math.ceil(len(scored) / 2))]
        for _, _, trial in keep:
            trial.kept = True
        alive, last = [t.candidate for _, _, t in keep], keep[0][2]
    else:
        if last is not None and beyond is not None:
            last = _past_the_edge(last, trials, score, beyond, max_beyond)
        if last is not None or len(alive) == 1:  # n == 1 has no rungs
            return SearchResult(last.candidate if last else alive[0], trials)
    first = next((t.error for t in trials if t.error), None)
    return SearchResult(None, trials, f"every candidate failed; first: {first}")


def _past_the_edge(best: Trial, trials: list[Trial], score, beyond, max_beyond: int) -> Trial:
    """The better of ``best`` and the candidates past the grid's edge (see
    :func:`successive_halving`), each trained at ``best``'s rung and steps."""
    for _ in range(max_beyond):
        nxt = beyond(best.candidate)
        if nxt is None:
            break
        trials.append(trial := Trial(dict(nxt), best.rung, best.steps, beyond_grid=True))
        value = _scored(trial, score)
        if value is None or value <= (best.score or -math.inf):
            break
        best.kept, trial.kept, best = False, True, trial
    return best
