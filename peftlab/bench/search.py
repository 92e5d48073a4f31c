"""``peftlab compare --tune KEYS``: each method's own search, run before its measured runs.

For each method, the candidates are :func:`peftlab.bench.tune.grid` of the method's declared
grid (``MethodSpec.tuning.grid``) over the requested keys it has. A key that no selected
method has is an error; a key that only some lack is dropped for those (the report says so),
and a method with none of the keys runs untuned at its prior. ``lr`` is the training
learning rate; every other key is a method option (``r``, ``bottleneck``,
``num_virtual_tokens``, …).

One search worker per method (``python -m peftlab.bench.worker --search SEARCH.json``) runs
:func:`~peftlab.bench.tune.successive_halving` in one process, its rungs stretched so the
search costs about :data:`SEARCH_RUNS` measured runs (:func:`search_budget`): each trial
trains a fresh copy of the model for its rung's steps with the comparison's first seed (a
setting already trained for as many steps is not trained again) and scores the final
evaluation of the *validation* split with :func:`peftlab.results.quality` (higher is better;
a loss is negated; an accuracy or exact match less :data:`TIE_BREAK` × the validation loss, so
that a small split's ties go to the better-fitting candidate). It writes ``compare-runs/search/<method>.json``: the chosen setting and
every trial (:meth:`~peftlab.bench.tune.SearchResult.to_dict`). The chosen setting then runs
at the full budget with every seed; each of those results carries the search table in
``train_info.tuning``. A search whose candidates all fail makes the method fail with the
first error; the other methods go on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from peftlab.bench import tune
from peftlab.bench.spec import RunSpec
from peftlab.core.config import ConfigError

MIN_STEPS = 2
"""Fewest steps a candidate trains at the first rung: one step says nothing of a setting."""
SEARCH_RUNS = 3.0
"""A search costs about this many measured runs: the rungs are stretched up to it."""
TIE_BREAK = 1e-4
"""Weight of the validation loss subtracted from a score (accuracy, exact match): it orders
candidates a small validation split scores alike, and is too small to reverse a difference of
one example in up to a thousand (loss differences between candidates stay well below 10)."""


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """One method's search: its candidates and the spec each trial starts from."""

    method: str
    keys: list[str]
    """The requested keys this method has a grid for, in the order given."""
    skipped: list[str]
    """Requested keys this method has no grid for (not searched for it)."""
    candidates: list[dict[str, Any]]
    budget: int
    """What the rungs are scaled from (:func:`search_budget`): rung ``k`` of ``R`` trains
    ``budget / 2^(R−k)`` steps."""
    min_steps: int
    base: RunSpec
    """The method's first-seed run, untuned; a trial replaces its setting, steps and dir."""
    result_path: str
    fingerprint: str = ""

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "base": self.base.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> SearchSpec:
        return cls(**{**data, "base": RunSpec.from_json(data["base"])})

    def rungs(self) -> list[int]:
        return tune.rung_steps(len(self.candidates), self.budget, self.min_steps)


def search_cost(n: int, budget: int, min_steps: int) -> int:
    """Steps successive halving trains in all for ``n`` candidates: Σ over rungs of the
    candidates left (``n``, ``⌈n/2⌉``, …) × the rung's steps."""
    total, alive = 0, n
    for steps in tune.rung_steps(n, budget, min_steps):
        total, alive = total + alive * steps, math.ceil(alive / 2)
    return total


def search_budget(n: int, steps: int, min_steps: int) -> int:
    """The budget the rungs are scaled from: a measured run's ``steps``, stretched as far as
    the search stays within :data:`SEARCH_RUNS` runs and no rung trains longer than a run.

    Why: the first rung must show a setting's effect. Plain halving of ``steps`` gives four
    learning rates ``steps/4`` steps each, often too few for any of them to move the
    validation score, and the search then keeps whichever did least. Four candidates cost
    ``2·steps`` unstretched; stretched to ``3·steps`` their rungs train 3/8 and 3/4 of a run.
    A larger grid (12 candidates already cost more than 3 runs) is not stretched.
    """
    budget = steps
    while budget < 2 * steps and search_cost(n, budget + 1, min_steps) <= SEARCH_RUNS * steps:
        budget += 1
    return budget


def apply_candidate(spec: RunSpec, candidate: dict[str, Any]) -> RunSpec:
    """``spec`` at ``candidate``'s setting: ``lr`` the learning rate, the rest method options."""
    options = {k: v for k, v in candidate.items() if k != "lr"}
    return dataclasses.replace(
        spec,
        lr=candidate.get("lr", spec.lr),
        method_args={**spec.method_args, **options},
        fingerprint="",
    )


def _grids(methods: list[str]) -> dict[str, dict[str, tuple]]:
    from peftlab.core.registry import get_method

    out = {}
    for m in methods:
        tuning = get_method(m).tuning
        out[m] = dict(tuning.grid) if tuning is not None else {}
    return out


def plan_searches(
    keys: tuple[str, ...], specs: list[RunSpec], user_set: dict[str, set[str]], runs_dir: Path
) -> dict[str, SearchSpec]:
    """One :class:`SearchSpec` per method that has at least one of ``keys``.

    ``user_set``: method → keys the user fixed (``--lr``, ``--set``); searching one of them
    is a contradiction and an error.
    """
    if not keys:
        return {}
    methods = list(dict.fromkeys(s.method for s in specs))
    grids = _grids(methods)
    for k in keys:
        if not any(k in grids[m] for m in methods):
            have = "; ".join(f"{m}: {', '.join(grids[m]) or 'none'}" for m in methods)
            raise ConfigError(
                f"--tune {k}: no selected method has a grid for {k!r}; tunable keys: {have}"
            )
    out = {}
    for m in methods:
        mine = [k for k in keys if k in grids[m]]
        fixed = sorted(set(mine) & user_set.get(m, set()))
        if fixed:
            flag = "--lr/--lr-full" if fixed == ["lr"] else f"--set {m}.{fixed[0]}=…"
            raise ConfigError(
                f"--tune {','.join(keys)}: {m}'s {fixed[0]!r} is both searched and fixed by "
                f"{flag}; drop one of them"
            )
        if not mine:
            continue
        base = next(s for s in specs if s.method == m)  # the first seed
        if not base.train_overrides.get("eval_size"):
            raise ConfigError(
                "--tune scores candidates on the validation split: eval_size must be > 0"
            )
        candidates = tune.grid(grids[m], mine, m)
        least = min(MIN_STEPS, base.steps)
        search = SearchSpec(
            method=m,
            keys=mine,
            skipped=[k for k in keys if k not in mine],
            candidates=candidates,
            budget=search_budget(len(candidates), base.steps, least),
            min_steps=least,
            base=dataclasses.replace(base, name=f"search-{m}", run_dir=str(runs_dir / m)),
            result_path=str(runs_dir / f"{m}.json"),
        )
        # Threads change how fast a search runs, not what it finds: a rerun with another
        # --threads resumes it (as the measured runs' fingerprints leave threads out).
        spec = search.to_json()
        spec = {**spec, "result_path": None, "base": {**spec["base"], "threads": None}}
        blob = json.dumps(spec, sort_keys=True, default=str)
        blob = json.dumps([base.fingerprint_of(base.to_json()), blob], default=str)
        fp = hashlib.sha256(blob.encode()).hexdigest()[:16]
        out[m] = dataclasses.replace(search, fingerprint=fp)
    return out


def lr_beyond(search: SearchSpec):
    """``beyond`` of :func:`~peftlab.bench.tune.successive_halving` for the learning rate: a
    winner at the grid's highest lr tries the next lr up, at the ratio of the grid's top two
    values (at its lowest, down by the ratio of the bottom two). Other keys (``r``, token
    counts) are capacity choices, not a scale a budget shifts, and are not extended."""
    lrs = sorted({c["lr"] for c in search.candidates if isinstance(c.get("lr"), int | float)})
    if len(lrs) < 2:
        return None
    up, down = lrs[-1] / lrs[-2], lrs[1] / lrs[0]

    def beyond(candidate: dict) -> dict | None:
        lr = candidate.get("lr")
        if lr is None or lrs[0] < lr < lrs[-1]:
            return None
        return {**candidate, "lr": float(f"{lr * up if lr >= lrs[-1] else lr / down:.3g}")}

    return beyond


def check_recorded(searches: dict[str, SearchSpec], specs: list[RunSpec]) -> None:
    """Refuse, before anything runs, a directory whose recorded search or tuned results are
    not this comparison's: a search with other settings would be overwritten, and results
    recorded without this search (another comparison's) would be replaced by this one's."""
    for method, search in searches.items():
        try:
            found = json.loads(Path(search.result_path).read_text())
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict) and found.get("fingerprint") != search.fingerprint:
            raise ConfigError(
                f"{search.result_path} holds a {method} search made with different settings "
                f"than this comparison (model, data, budget or grid differ); pass another "
                f"--out, or delete that file to search again"
            )
        if found is None:
            held = [s.result_path for s in specs if s.method == method]
            held = [p for p in held if Path(p).exists()]
            if held:
                raise ConfigError(
                    f"{held[0]} holds a {method} run that this comparison's search did not "
                    f"choose (no search of these settings is recorded); pass another --out, "
                    f"or delete that file to rerun it"
                )


def untuned_note(keys: tuple[str, ...], method: str) -> dict | None:
    """``train_info.tuning`` of a method that has none of the searched keys."""
    if not keys:
        return None
    return {
        "keys": [],
        "skipped": list(keys),
        "chosen": None,
        "note": f"{method} has no grid for {', '.join(keys)}: runs at its prior setting",
    }


def tuning_record(search: SearchSpec, found: dict) -> dict:
    """``train_info.tuning`` of each measured run after ``search`` (``found``: its JSON)."""
    note = f"searched {', '.join(search.keys)} on the validation split"
    if search.skipped:
        note += f"; no grid for {', '.join(search.skipped)} (not searched for {search.method})"
    return {
        "keys": search.keys,
        "skipped": search.skipped,
        "chosen": found["search"]["best"],
        "error": found["search"]["error"],
        "score": found.get("score"),
        "rungs": search.rungs(),
        "steps": search.base.steps,
        "search_steps": search_cost(len(search.candidates), search.budget, search.min_steps)
        + sum(t["steps"] for t in found["search"]["trials"] if t.get("beyond_grid")),
        "note": note,
        "search": found["search"],
    }


# ---------------------------------------------------------------- in the search worker


def run_search(search: SearchSpec) -> dict:
    """Run the successive-halving search of ``search`` in this process; returns its JSON."""
    import torch

    from peftlab.models import load_model, load_tokenizer
    from peftlab.results import quality_of
    from peftlab.train import train
    from peftlab.train.config import TrainConfig
    from peftlab.train.taskdata import load_data, num_labels

    base = search.base
    tokenizer = load_tokenizer(base.model)
    labels = num_labels(load_data(TrainConfig.from_dict(base.train_config()), tokenizer, base.kind))
    count = iter(range(10**6))
    loaded: dict[str, tuple] = {}

    def fresh(pooling: str):
        """The model as ``load_model`` returns it after ``manual_seed(seed)``, with the random
        state that leaves: loaded once per search (candidates never change how it loads), so
        each trial pays a copy instead of a load, and trains exactly as if it had loaded."""
        if pooling not in loaded:
            torch.manual_seed(base.seed)
            model = load_model(base.model, kind=base.kind, num_labels=labels, pooling=pooling)
            loaded[pooling] = (model, torch.get_rng_state())
        model, rng = loaded[pooling]
        torch.set_rng_state(rng)
        return copy.deepcopy(model)

    scored: dict[str, str] = {}
    done: dict[str, float] = {}

    def score(candidate: dict, steps: int) -> float:
        key = json.dumps([candidate, steps], sort_keys=True)
        if key in done:  # same setting, steps and seed: the same run (rungs of equal length)
            return done[key]
        done[key] = value = _trial(candidate, steps)
        return value

    def _trial(candidate: dict, steps: int) -> float:
        spec = dataclasses.replace(
            apply_candidate(base, candidate),
            steps=steps,
            run_dir=str(Path(base.run_dir) / f"trial-{next(count)}"),
        )
        # A trial is scored on the validation split after training, nothing else: its
        # step-0 score is the same for every candidate and the test split is not its to see.
        config = {**spec.train_config(), "eval_before": False, "eval_test": False}
        model = fresh(config.get("pooling", "auto"))
        try:
            summary = train(config, model=model, tokenizer=tokenizer)
        finally:
            shutil.rmtree(spec.run_dir, ignore_errors=True)  # its adapter is never used
        metrics = summary.get("eval_after") or {}
        q = quality_of(metrics, "eval", "validation")
        if q is None:
            raise ValueError("the trial's validation evaluation holds no quality figure")
        if q.name == "loss":
            scored["score"] = "validation loss, negated"
            return q.score
        scored["score"] = f"validation {q.name}, ties broken by validation loss"
        return q.score - TIE_BREAK * float(metrics.get("eval_loss", 0.0))

    result = tune.successive_halving(
        search.candidates, search.budget, score, search.min_steps, beyond=lr_beyond(search)
    )
    return {
        "method": search.method,
        "fingerprint": search.fingerprint,
        "keys": search.keys,
        "skipped": search.skipped,
        "candidates": search.candidates,
        "rungs": search.rungs(),
        "score": scored.get("score"),
        "search": result.to_dict(),
    }
