"""What every method of a comparison must beat, and whether it does.

Every run scores two baselines on the split its quality is reported on (the test split when
the data has one, else the validation split):

- **Majority class** (classification): always answer the most frequent class of the
  *training* labels (:func:`peftlab.train.metrics.majority_baseline`), scored on the split.
- **Base model, untrained** (zero-shot): the model with no method applied, evaluated with the
  same metrics on the same split — for a causal LM the method-free prompt. A classifier's head
  is new and randomly initialized (as every method's is before training), so its score is
  chance by construction: it shows what training changed, not a zero-shot classifier.

**Beats** (:func:`beats`): a method beats a baseline when the lower end of the 95% interval
of its quality lies above the baseline's mean (for a loss: the upper end below it). With
several seeds the interval is Student's t over seeds (:func:`peftlab.bench.stats.interval`);
with one seed, for a proportion (accuracy, exact match), the Wilson score interval over the
split's ``n`` examples: ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``, z = 1.96.
A loss with one seed has no interval, so nothing is claimed.

**Scored once per setting** (:func:`cached`): the base model's score depends only on the model,
its head's seed, the data's splits and the metrics, so the methods of one comparison share it
(a file per setting under ``compare-runs/baselines/``) instead of each run evaluating the
untrained model again (on SmolLM2's generation task, ~20 s of a 2-minute run).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from peftlab.bench import stats
from peftlab.core.fileio import atomic_write_json

Z95 = 1.959964
PROPORTIONS = ("accuracy", "exact_match")
"""Quality figures that are proportions of examples (a Wilson interval applies)."""


def held_out(data) -> tuple[str, list[dict]]:
    """The split quality is reported on: ``("test", examples)`` when the data has a test
    split, else ``("validation", examples)``."""
    test = getattr(data, "test", None)
    return ("test", test) if test else ("validation", data.eval)


def majority(data) -> dict | None:
    """The majority-class baseline on :func:`held_out` (classification), else None."""
    from peftlab.train.metrics import majority_baseline
    from peftlab.train.taskdata import num_labels

    if data.kind != "classification":
        return None
    _, examples = held_out(data)
    labels = [int(e["label"]) for e in examples]
    train = [int(e["label"]) for e in data.train]
    out = majority_baseline(labels, num_labels(data), train)
    out["label"] = data.label_names[out["class"]] if data.label_names else out["class"]
    return out


def base_model(model, tokenizer, data, batch_size: int, device, exact_match: bool, **kw) -> dict:
    """The untrained model's metrics on :func:`held_out`, keys without their split prefix
    (``loss``, ``accuracy``, …); ``kw``: :func:`~peftlab.train.evaluate.evaluate`'s
    ``extractor`` and ``metric``."""
    from peftlab.train.evaluate import evaluate

    split, _ = held_out(data)
    if split == "test":  # only splits that exist ask for one
        kw["split"] = "test"
    metrics = evaluate(model, tokenizer, data, batch_size, exact_match, device, **kw)
    return {k.split("_", 1)[1]: v for k, v in metrics.items()}


def cached(directory: Path, setting: dict, score: Callable[[], dict]) -> dict:
    """``score()``, or what it returned before for the same ``setting`` (a JSON-able dict of
    everything the score depends on), kept in ``directory``. An unreadable or foreign file is
    scored again and replaced; two runs scoring one setting at once write the same numbers."""
    text = json.dumps(setting, sort_keys=True, default=str)
    path = Path(directory) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    try:
        found = json.loads(path.read_text())
        if found.get("setting") == json.loads(text):
            return found["metrics"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    metrics = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"setting": json.loads(text), "metrics": metrics})
    return metrics


def record(data, base_metrics: dict | None) -> dict:
    """``train_info.baselines`` of one run."""
    split, examples = held_out(data)
    out = {"split": split, "examples": len(examples), "majority": majority(data)}
    if base_metrics is not None:
        note = (
            "the untrained model; its classification head is new and random"
            if data.kind == "classification"
            else "the untrained model on the method-free prompt"
        )
        out["base_model"] = {**base_metrics, "note": note}
    return out


def wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` observed on ``n`` examples."""
    if n <= 0:
        raise ValueError("a Wilson interval needs n >= 1 examples")
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def beats(
    values: Sequence[float],
    baseline: float,
    name: str,
    higher_is_better: bool,
    examples: int | None,
) -> dict:
    """Whether a method's quality ``values`` (one per seed) beat ``baseline``:
    ``{"beats": True/False/None, "low", "high", "how"}`` (None: no interval to tell)."""
    iv = stats.interval(values)
    if iv is None:
        return {"beats": None, "low": None, "high": None, "how": "no value"}
    if iv.half_width is not None:
        low, high, how = iv.low, iv.high, f"t interval over {iv.n} seeds"
    elif name in PROPORTIONS and examples:
        low, high = wilson(min(1.0, max(0.0, iv.mean)), examples)
        how = f"one seed: Wilson interval over {examples} examples"
    else:
        return {"beats": None, "low": None, "high": None, "how": "one seed, no interval"}
    # A margin of rounding: seeds that all score exactly the baseline (a classifier answering
    # the majority class every time) have a zero-width interval whose mean can exceed the
    # baseline by 1e-16; that is a tie, not a win.
    eps = 1e-9 * max(1.0, abs(baseline))
    won = low > baseline + eps if higher_is_better else high < baseline - eps
    return {"beats": won, "low": low, "high": high, "how": how}
