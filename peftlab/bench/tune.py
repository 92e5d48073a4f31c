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


def successive_halving(
    candidates: Sequence[dict[str, Any]],
    budget: int,
    score: Callable[[dict[str, Any], int], float],
    min_steps: int = 1,
) -> SearchResult:
    """Search ``candidates`` with ``score(candidate, steps)`` (higher is better, measured on the
    validation split); returns the survivor and every trial."""
    alive = [dict(c) for c in candidates]
    trials: list[Trial] = []
    first_error: str | None = None
    for rung, steps in enumerate(rung_steps(len(alive), budget, min_steps)):
        scored: list[tuple[float, int, Trial]] = []
        for i, cand in enumerate(alive):
            trial = Trial(cand, rung, steps)
            try:
                value = float(score(cand, steps))
                if not math.isfinite(value):
                    raise ValueError(f"validation score {value}")
                trial.score = value
                scored.append((value, i, trial))
            except Exception as e:  # one candidate failing must not end the search
                trial.error = f"{type(e).__name__}: {e}"
                first_error = first_error or trial.error
            trials.append(trial)
        if not scored:
            return SearchResult(None, trials, f"every candidate failed; first: {first_error}")
        scored.sort(key=lambda t: (-t[0], t[1]))  # ties: the earlier (grid-order) candidate
        keep = scored[: max(1, math.ceil(len(scored) / 2))]
        for _, _, trial in keep:
            trial.kept = True
        alive = [t.candidate for _, _, t in keep]
    if len(alive) > 1:  # fewer rungs than halvings needed (n == 1 has none)
        alive = alive[:1]
    if not alive:
        return SearchResult(None, trials, f"every candidate failed; first: {first_error}")
    return SearchResult(alive[0], trials)
