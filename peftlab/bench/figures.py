"""The report's figures (PNG bytes): loss curves, memory, speed, and quality against trainable
parameters with 95% intervals over seeds as error bars and the baselines as lines."""

from __future__ import annotations

import io

NAMES = ("loss_curves", "memory", "speed", "params_vs_quality")


def figures(summary: dict[str, dict], comparison: dict | None = None) -> dict[str, bytes]:
    """PNG bytes of each figure of :data:`NAMES` (none when no method succeeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {m: s for m, s in summary.items() if s["status"] != "failed"}
    if not ok:
        return {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    return {
        "loss_curves": png(_loss_curves(plt, ok)),
        "memory": png(_memory(plt, ok)),
        "speed": png(_speed(plt, ok)),
        "params_vs_quality": png(_params_vs_quality(plt, ok, comparison or {})),
    }


def _half(s: dict, key: str, scale: float = 1.0) -> float:
    iv = (s.get("intervals") or {}).get(key) or {}
    return (iv.get("ci95") or 0.0) * scale


def _mean(s: dict, key: str, fallback: str, scale: float = 1.0) -> float:
    iv = (s.get("intervals") or {}).get(key) or {}
    v = iv.get("mean", s.get(fallback))
    return (v or 0.0) * scale


def _loss_curves(plt, ok: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, s in ok.items():
        for i, curve in enumerate(s["loss_curves"]):
            if curve:
                steps, losses = zip(*curve)
                ax.plot(steps, losses, label=m if i == 0 else None, alpha=1.0 if i == 0 else 0.4)
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves (every seed)", yscale="log")
    ax.legend(fontsize=8)
    return fig


def _memory(plt, ok: dict):
    names, mib = list(ok), 1 / 2**20
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        [i - 0.2 for i in x],
        [_mean(ok[m], "memory_total_bytes", "memory_total_bytes", mib) for m in names],
        yerr=[_half(ok[m], "memory_total_bytes", mib) for m in names],
        width=0.4,
        label="total to train",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [_mean(ok[m], "memory_bytes", "memory_bytes", mib) for m in names],
        yerr=[_half(ok[m], "memory_bytes", mib) for m in names],
        width=0.4,
        label="above loaded model",
    )
    ax.set_xticks(list(x), names, rotation=30)
    ax.set(ylabel="MiB (mean ± 95% interval)", title="Peak training memory")
    ax.legend(fontsize=8)
    return fig


def _speed(plt, ok: dict):
    names = list(ok)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        names,
        [_mean(ok[m], "tokens_per_s", "tokens_per_s") for m in names],
        yerr=[_half(ok[m], "tokens_per_s") for m in names],
    )
    ax.set(ylabel="training tokens/s (mean ± 95% interval)", title="Training speed")
    ax.tick_params(axis="x", rotation=30)
    return fig


def _params_vs_quality(plt, ok: dict, comparison: dict):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = comparison.get("quality") or next(
        (s["quality"]["name"] for s in ok.values() if s.get("quality")), None
    )
    for m, s in ok.items():
        q = s.get("quality")
        if not q or q["name"] != key or not q["by_seed"]:
            continue
        mean = _mean(s, "quality", "metric")
        ax.errorbar(
            s["trainable_params"], mean, yerr=_half(s, "quality"), fmt="o", capsize=4, label=m
        )
        ax.annotate(m, (s["trainable_params"], mean), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    styles = {"majority": ("--", "majority class"), "base_model": (":", "untrained base model")}
    for name, base in (comparison.get("baselines") or {}).items():
        if base:
            ax.axhline(base["value"], linestyle=styles[name][0], color="grey",
                       label=f"{styles[name][1]} ({base['value']:.3g})")  # fmt: skip
    split = comparison.get("split", "validation")
    label = "loss (lower is better)" if key == "loss" else (key or "quality").replace("_", " ")
    ax.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel=f"{split} {label}",
        title="Quality vs trainable parameters (mean ± 95% interval over seeds)",
    )
    ax.legend(fontsize=7)
    return fig
