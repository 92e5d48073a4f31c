"""From runs to findings: each method's figures over its seeds, and methods against each other.

:func:`summarize` gives each method its figures over its seeds: medians of the measurements
(the keys every earlier report had) and, for every measured number the report shows, the mean
with its 95% interval over seeds (:func:`peftlab.bench.stats.interval`) under ``intervals``;
the quality is :func:`peftlab.results.quality`'s headline (the test split when the data has
one, else the validation split), per seed. :func:`compare_methods` names the best method by
quality and gives every other one :func:`peftlab.bench.stats.verdict` against it (paired by
seed; "not separated" when the interval of the difference includes 0), and says which methods
beat each baseline (:func:`peftlab.bench.baselines.beats`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

from peftlab.bench import baselines as baselines_mod
from peftlab.bench import measure, stats, timing
from peftlab.results import RunResult, quality


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _interval(values) -> dict | None:
    iv = stats.interval([v for v in values if v is not None])
    return iv.to_dict() if iv is not None else None


def summarize(results: Sequence[RunResult | dict]) -> dict[str, dict]:
    """Method → figures aggregated over its seeds (medians of measurements, means of quality,
    cross-seed spread of final loss and quality, and the intervals). ``metric_name``/``metric``
    are the runs' :func:`~peftlab.results.quality`; :func:`~peftlab.bench.claims.check_claims`
    reads the rest."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in map(RunResult.coerce, results):
        by_method[r.method].append(r)
    out: dict[str, dict] = {}
    for method, runs in by_method.items():
        ok = [r for r in runs if r.ok]
        if not ok:
            out[method] = {
                "status": "failed",
                "error": runs[0].train_info.error,
                "seeds": len(runs),
            }
            if runs[0].train_info.tuning:
                out[method]["tuning"] = runs[0].train_info.tuning
            continue
        out[method] = {**_summarize_ok(ok, len(runs)), **_findings(ok)}
    return out


def _summarize_ok(runs: list[RunResult], n_runs: int) -> dict:
    """The figures of one method from its successful runs (of ``n_runs``)."""
    infos = [t.train_info for t in runs]
    first = infos[0]
    qualities = [quality(r) for r in runs]
    named = next((q for q in qualities if q is not None), None)
    metrics = [q.value if q and named and q.name == named.name else None for q in qualities]
    finals = [(t.eval or {}).get("eval_loss", t.final_loss) for t in infos]
    loss_spread = measure.spread(finals)
    unmerged = [t.inference.unmerged_vs_base for t in infos]
    merged = [t.inference.merged_vs_base for t in infos]
    deploy_form = "merged" if first.mergeable and merged[0] else "unmerged"
    deploy = [
        timing.overhead_fraction(m if deploy_form == "merged" else u)
        for u, m in zip(unmerged, merged)
    ]
    memory = [t.peak_memory for t in infos]
    predictions = [m.prediction for m in memory if m.prediction is not None]
    return {
        "status": "ok" if len(runs) == n_runs else "partly failed",
        "seeds": n_runs,
        "trainable_params": first.trainable_params,
        "total_params": first.total_params,
        "trainable_percent": first.trainable_percent,
        "adapter_bytes": first.adapter_bytes,
        "memory_bytes": _median(m.bytes for m in memory),
        "memory_total_bytes": _median(m.total_bytes for m in memory),
        "memory_predicted_bytes": _median(p.predicted_bytes for p in predictions),
        "memory_loop_bytes": _median(p.measured_bytes for p in predictions),
        "step_time_s": _median(t.step_time_median_s for t in infos),
        "tokens_per_s": _median(t.tokens_per_s for t in infos),
        "unmerged_overhead": _median(timing.overhead_fraction(u) for u in unmerged),
        "merged_overhead": _median(timing.overhead_fraction(m) for m in merged),
        "deploy_overhead": _median(deploy),
        "deploy_form": deploy_form,
        "stability": {
            "loss_spikes": max(t.stability.loss_spikes for t in infos),
            "loss_variability": _median(t.stability.loss_variability for t in infos),
        },
        "final_loss_spread": loss_spread,
        "metric_spread": measure.spread(metrics),
        "seed_cv": loss_spread["std"] / loss_spread["mean"]
        if loss_spread and loss_spread["mean"]
        else None,
        "eval_loss": _median((t.eval or {}).get("eval_loss") for t in infos),
        "eval_ppl": _median((t.eval or {}).get("eval_ppl") for t in infos),
        # The quality (see peftlab.results.quality) averaged over seeds.
        "metric_name": named.name if named else None,
        "metric_higher_is_better": named.higher_is_better if named else None,
        "metric": statistics.fmean([m for m in metrics if m is not None])
        if any(m is not None for m in metrics)
        else None,
        "loss_curves": [t.loss_curve for t in infos],
    }


def _findings(runs: list[RunResult]) -> dict:
    """What the report states with uncertainty: per-seed quality, intervals, baselines, timing
    reliability and findings, and the tuning."""
    infos = [r.train_info for r in runs]
    qualities = [quality(r) for r in runs]
    named = next((q for q in qualities if q is not None), None)
    by_seed = {
        r.run_info.seed: q.value
        for r, q in zip(runs, qualities)
        if q is not None and named is not None and q.name == named.name
    }
    memory = [t.peak_memory for t in infos]
    return {
        "quality": None
        if named is None
        else {
            "name": named.name,
            "split": named.split,
            "higher_is_better": named.higher_is_better,
            "by_seed": by_seed,
        },
        "intervals": {
            "quality": _interval(by_seed.values()),
            "memory_total_bytes": _interval(m.total_bytes for m in memory),
            "memory_bytes": _interval(m.bytes for m in memory),
            "step_time_s": _interval(t.step_time_median_s for t in infos),
            "tokens_per_s": _interval(t.tokens_per_s for t in infos),
        },
        "baselines": _baselines(runs),
        "deploy_timing": _deploy_timing(runs),
        "lr": runs[0].run_info.lr,
        "method_args": runs[0].run_info.method_args,
        "tuning": infos[0].tuning,
    }


def _baselines(runs: list[RunResult]) -> dict | None:
    """Each baseline's value per seed on the quality's split (majority: its accuracy; base
    model: the quality's figure)."""
    recs = [(r.run_info.seed, r.train_info.baselines) for r in runs if r.train_info.baselines]
    if not recs:
        return None
    q = quality(runs[0])
    out: dict = {"split": recs[0][1].get("split"), "examples": recs[0][1].get("examples")}
    majority = {s: b["majority"]["accuracy"] for s, b in recs if b.get("majority")}
    if majority:
        out["majority"] = {"name": "accuracy", "by_seed": majority}
    if q is not None:
        base = {s: b["base_model"].get(q.name) for s, b in recs if b.get("base_model")}
        base = {s: v for s, v in base.items() if v is not None}
        if base:
            note = recs[0][1]["base_model"].get("note")
            out["base_model"] = {"name": q.name, "by_seed": base, "note": note}
    return out


def _deploy_timing(runs: list[RunResult]) -> dict:
    """The deployed form's timing over seeds: reliable only when every run's was; the finding
    from the median slowdown against the widest noise floor of the runs."""
    infos = [r.train_info for r in runs]
    first = infos[0]
    form = "merged" if first.mergeable and first.inference.merged_vs_base else "unmerged"
    checks = []
    for r in runs:
        t = r.train_info.timing
        if t and "reliable" in t:
            checks.append(t)
        else:  # written before load readings existed
            checks.append(
                timing.legacy_reliability(r.meta_info.load_average, r.meta_info.cpu_count)
            )
    unreliable = [c["why"] for c in checks if not c["reliable"]]
    noises = [(t.timing or {}).get("noise_floor") for t in infos]
    noises = [n for n in noises if n is not None]
    ratios = [getattr(t.inference, f"{form}_vs_base") for t in infos]
    o = _median(timing.overhead_fraction(x) for x in ratios)
    out = {"form": form, "reliable": not unreliable, "why": unreliable[0] if unreliable else ""}
    if noises and o is not None:
        can_be_faster = form == "unmerged" and not first.trains_base
        out.update(stats.timing_verdict(1.0 + o, max(noises), can_be_faster))
    return out


# ---------------------------------------------------------------- methods against each other


def _values(s: dict) -> dict:
    return (s.get("quality") or {}).get("by_seed") or {}


def compare_methods(summary: dict[str, dict]) -> dict:
    """The best method by quality, every other method's verdict against it, and which methods
    beat each baseline. Methods are compared on the quality most of them report."""
    ok = {m: s for m, s in summary.items() if s.get("status") != "failed" and _values(s)}
    if not ok:
        return {"best": None, "verdicts": [], "baselines": {}}
    names = [(s["quality"]["name"], s["quality"]["split"]) for s in ok.values()]
    name, split = max(set(names), key=names.count)
    ok = {
        m: s
        for m, s in ok.items()
        if (s["quality"]["name"], s["quality"]["split"]) == (name, split)
    }
    higher = next(iter(ok.values()))["quality"]["higher_is_better"]
    means = {m: statistics.fmean(_values(s).values()) for m, s in ok.items()}
    best = (max if higher else min)(means, key=means.get)
    verdicts, unseparated = [], []
    for m in ok:
        if m == best:
            continue
        a, b = _values(ok[best]), _values(ok[m])
        common = sorted(set(a) & set(b))
        if len(common) >= 2:  # the same seeds on both sides: paired
            va, vb = [a[k] for k in common], [b[k] for k in common]
        else:
            va, vb = list(a.values()), list(b.values())
        verdicts.append(stats.verdict(best, va, m, vb, higher_is_better=higher))
        if not stats.difference(va, vb).separated:
            unseparated.append(m)
    return {
        "unseparated": unseparated,
        "quality": name,
        "split": split,
        "higher_is_better": higher,
        "best": best,
        "best_mean": means[best],
        "verdicts": verdicts,
        "baselines": {k: _against(ok, k, name, higher) for k in ("majority", "base_model")},
    }


def _against(ok: dict[str, dict], key: str, name: str, higher: bool) -> dict | None:
    """Whether each method beats baseline ``key`` (its mean over seeds)."""
    values = [
        v
        for s in ok.values()
        for v in (((s.get("baselines") or {}).get(key) or {}).get("by_seed") or {}).values()
    ]
    first = next(
        (s["baselines"][key] for s in ok.values() if (s.get("baselines") or {}).get(key)), None
    )
    if not values or first is None or first["name"] != name:
        return None
    level = statistics.fmean(values)
    examples = next(
        (s["baselines"].get("examples") for s in ok.values() if s.get("baselines")), None
    )
    methods = {
        m: baselines_mod.beats(list(_values(s).values()), level, name, higher, examples)
        for m, s in ok.items()
    }
    return {
        "value": level,
        "name": name,
        "note": first.get("note"),
        "methods": methods,
        "all_beat": all(v["beats"] for v in methods.values()),
    }
