"""Every figure the reports draw: metric curves per run, the grid's before/after, the arms' bands.

matplotlib is imported when a figure is drawn, with the Agg backend (files
only, no display), so reading run dirs and writing tables never needs it.
Each function takes rows the reports already computed and writes one PNG;
nothing here reads a run dir or computes a statistic of its own.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# (metric, title) of the side-by-side report's curves, one PNG each when any run logged it.
PLOTTED = [
    ("train/pass@1", "pass@1 on the step's prompts"),
    ("eval/pass@1", "eval pass@1"),
    ("label/accuracy", "pseudo-label accuracy"),
    ("label/majority_ratio", "majority ratio"),
    ("reward/mean", "mean reward"),
    ("train/entropy", "policy entropy"),
    ("train/kl", "KL to the reference policy"),
]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_curves(curves: dict[str, list[tuple[str, list[tuple[int, float]]]]], out: Path) -> list[Path]:
    """One PNG per metric: {metric: [(run label, [(step, value)])]} -> compare_<metric>.png files in `out`."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    written = []
    for key, title in PLOTTED:
        lines = curves.get(key, [])
        if not any(s for _, s in lines):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for label, s in lines:
            if s:
                xs, ys = zip(*s)
                ax.plot(xs, ys, marker="o" if len(s) < 12 else None, markersize=4, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"compare_{key.replace('/', '_').replace('@', 'at')}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def grid_before_after(runs: list[dict[str, Any]], out: Path) -> Path:
    """The grid's runs (in the order given): eval pass@1 and maj@N before (open) and after (filled)."""
    plt = _pyplot()
    colors = {"ttrl": "tab:blue", "oracle": "tab:green", "random": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    for ax, (a, b, name) in zip(axes, [("pass1_before", "pass1_after", "eval pass@1"),
                                       ("maj_before", "maj_after", "eval maj@N")]):
        for x, r in enumerate(runs):
            c = colors.get(r["arm"], "tab:purple")
            ax.plot([x, x], [r[a], r[b]], color=c, linewidth=2)
            ax.plot(x, r[a], "o", color=c, markerfacecolor="white")
            ax.plot(x, r[b], "o", color=c)
            if r["guard_step"] is not None:
                ax.plot(x, r[b], "x", color="red", markersize=10)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{r['arm']} {r['warm_start']} s{r['seed']}" for r in runs], rotation=70, fontsize=7)
        ax.set_title(f"{name}: before (open) → after (filled); red x: guard fired", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of test prompts")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def arms_bands(table: list[dict[str, Any]], path: Path) -> Path | None:
    """Each arm's mean eval pass@1 over steps, with a band from its worst to its best seed; None if no curves."""
    arms = list(dict.fromkeys(r["arm"] for r in table if len(r["curve"]) >= 1))
    if not arms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for arm in arms:
        curves = [dict(r["curve"]) for r in table if r["arm"] == arm and r["curve"]]
        # Steps that every seed evaluated: a band over fewer seeds would look narrower than it is.
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        ys = [[c[s] for c in curves] for s in steps]
        line, = ax.plot(steps, [statistics.mean(y) for y in ys], marker="o", markersize=3,
                        label=f"{arm} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.18)
    ax.set_xlabel("training step")
    ax.set_ylabel("eval pass@1 (held-out prompts)")
    ax.set_title("pass@1 per arm: mean over seeds, band = worst to best seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
