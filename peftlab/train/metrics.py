"""Metrics that fit the task: classification from a confusion matrix, generation from answers.

Classification metrics are computed from the confusion matrix ``C`` (``C[t][p]`` = examples of
true class ``t`` predicted as ``p``), which is a sum over examples, so several processes add
their matrices before any ratio is taken:

- **accuracy** ``= Σ_k C[k][k] / N``;
- **macro-F1** ``= mean_k 2·TP_k / (2·TP_k + FP_k + FN_k)`` over the classes that occur (in the
  labels or the predictions); a class never seen nor predicted does not count;
- **Matthews correlation** (Gorodkin's multi-class form, equal to the φ coefficient for two
  classes): ``(c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))`` with ``c`` the
  correct count, ``s = N``, ``p_k`` the times class k was predicted and ``t_k`` the times it
  occurs; 0 when either marginal is constant (a model that always answers one class).

Generation is scored by **exact match after answer extraction**: the reference and the greedy
generation are both reduced by the same extractor, then compared after whitespace
normalization. Extractors: ``"exact"`` (the whole text), ``"####"`` (the text after the last
``####``, GSM8K's answer marker), ``"last-number"`` (the last number, commas dropped, ``3.0``
== ``3``), ``"regex:<pattern>"`` (the first capture group, or the whole match, of the last
match). A user metric ``"module:function"`` is called as ``function(predictions, references)``
on the raw texts and must return a finite number.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

EXTRACTORS = ("exact", "####", "last-number", "regex:<pattern>")


class MetricError(ValueError):
    """A metric or answer extractor is misconfigured or returned something unusable."""


# ---- classification --------------------------------------------------------------------------


def confusion(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> list[list[int]]:
    """``C[true][pred]`` counts."""
    c = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(preds, labels):
        c[int(t)][int(p)] += 1
    return c


def accuracy(c: Sequence[Sequence[float]]) -> float:
    n = sum(map(sum, c))
    return sum(c[k][k] for k in range(len(c))) / n if n else 0.0


def macro_f1(c: Sequence[Sequence[float]]) -> float:
    k = len(c)
    scores = []
    for i in range(k):
        tp = c[i][i]
        fn = sum(c[i]) - tp
        fp = sum(c[j][i] for j in range(k)) - tp
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def mcc(c: Sequence[Sequence[float]]) -> float:
    k = len(c)
    s = sum(map(sum, c))
    correct = sum(c[i][i] for i in range(k))
    t = [sum(c[i]) for i in range(k)]  # occurrences of each class
    p = [sum(c[j][i] for j in range(k)) for i in range(k)]  # predictions of each class
    denom = (s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t))
    if denom <= 0:
        return 0.0
    return (correct * s - sum(a * b for a, b in zip(p, t))) / math.sqrt(denom)


def classification_metrics(c: Sequence[Sequence[float]]) -> dict[str, float]:
    """``accuracy``, ``macro_f1`` and ``mcc`` of a confusion matrix."""
    return {"accuracy": accuracy(c), "macro_f1": macro_f1(c), "mcc": mcc(c)}


def majority_baseline(labels: Sequence[int], num_classes: int, train_labels=None) -> dict:
    """Metrics of always answering the most frequent class of ``train_labels`` (default: of
    ``labels`` themselves), scored on ``labels``: the floor every trained method must beat."""
    source = list(train_labels if train_labels is not None else labels)
    if not source:
        raise MetricError("the majority-class baseline needs at least one label")
    majority = max(range(num_classes), key=source.count)
    return {"class": majority, **classification_metrics(
        confusion([majority] * len(labels), labels, num_classes)
    )}  # fmt: skip


# ---- generation ------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def check_extractor(spec: str) -> str:
    """``spec`` if it names an extractor (a regex must compile), else :class:`MetricError`."""
    if spec in ("exact", "####", "last-number"):
        return spec
    if isinstance(spec, str) and spec.startswith("regex:"):
        try:
            re.compile(spec[len("regex:") :])
        except re.error as e:
            raise MetricError(
                f"answer_extractor={spec!r}: the regex does not compile ({e})"
            ) from None
        return spec
    raise MetricError(f"answer_extractor={spec!r} is invalid: use one of {', '.join(EXTRACTORS)}")


def _number(text: str) -> str:
    s = text.replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v.is_integer() else repr(v)


def extract(text: str, spec: str = "exact") -> str | None:
    """The answer in ``text`` per extractor ``spec`` (normalized), or None when none is found."""
    if spec == "exact":
        return " ".join(text.split())
    if spec == "####":
        if "####" not in text:
            return None
        return " ".join(text.rsplit("####", 1)[1].split()) or None
    if spec == "last-number":
        found = _NUMBER.findall(text)
        return _number(found[-1]) if found else None
    pattern = re.compile(check_extractor(spec)[len("regex:") :])
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return " ".join((m.group(1) if m.groups() else m.group(0)).split())


def exact_match_hits(preds: Sequence[str], refs: Sequence[str], spec: str = "exact") -> int:
    """Predictions whose extracted answer equals the reference's (a reference without an
    answer falls back to its whole normalized text)."""
    check_extractor(spec)
    hits = 0
    for p, r in zip(preds, refs):
        want = extract(r, spec) or extract(r, "exact")
        hits += int(extract(p, spec) == want)
    return hits


def load_user_metric(spec: str) -> Callable[[list[str], list[str]], float]:
    """The function named ``"module:function"``, importable from the environment or the
    current directory."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise MetricError(
            f"metric={spec!r} is invalid: give 'module:function', e.g. 'mymetrics:f1'"
        )
    module, name = spec.split(":")
    if os.getcwd() not in sys.path:  # a metrics file beside the data, as `python -m` would see
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 — the user's module: any import error, one line
        raise MetricError(f"metric={spec!r}: cannot load it ({e})") from None
    if not callable(fn):
        raise MetricError(f"metric={spec!r}: {name} is not a function")
    return fn


def call_user_metric(spec: str, preds: list[str], refs: list[str]) -> float:
    """Call the user metric and check it returned a finite number (one-line error otherwise)."""
    fn = load_user_metric(spec)
    try:
        value = fn(list(preds), list(refs))
    except Exception as e:  # the user's code: report it in one line, name the metric
        raise MetricError(f"metric={spec!r} raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MetricError(f"metric={spec!r} returned {value!r}; it must return a finite number")
    return float(value)
