"""A PNG of a run's learning curves, drawn from its metrics rows.

One line per metric over training steps (pass@1 on the step's prompts,
pseudo-label accuracy, majority ratio, mean reward) and the periodic
evaluation's pass@1 as markers. Headless (Agg backend); reads nothing but
the rows it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LINES = [
    ("train/pass@1", "pass@1 (training prompts)"),
    ("label/accuracy", "pseudo-label accuracy"),
    ("label/majority_ratio", "majority ratio"),
    ("reward/mean", "mean reward"),
]


def plot_run(rows: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for key, label in LINES:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step", 0) > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, linewidth=1.6)
    ev = [(r["step"], r["eval/pass@1"]) for r in rows if r.get("eval/pass@1") is not None]
    if ev:
        xs, ys = zip(*ev)
        ax.plot(xs, ys, "o--", color="black", label="eval pass@1 (all test prompts)", markersize=6)
    maj = [(r["step"], v) for r in rows for k, v in r.items() if k.startswith("eval/maj@") and
           not k.endswith("_stderr") and k != "eval/maj@1" and v is not None]
    if maj:
        xs, ys = zip(*maj)
        ax.plot(xs, ys, "s:", color="gray", label="eval maj@N", markersize=5)
    ax.set_xlabel("training step")
    ax.set_ylabel("share (0 to 1)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
