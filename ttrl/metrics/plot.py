"""A PNG of a run's learning curves, drawn from its metrics rows.

Four panels over training steps, each on its own scale so no line hides
another: accuracy against ground truth (pass@1 on the step's prompts,
pseudo-label accuracy, and the periodic evaluation's pass@1 and maj@N as
markers; metrics only), the label-free signals the guard watches (majority
ratio, vote flips, drift from the first votes), the mean reward, and the
policy's token entropy. The step where the collapse guard first fired is a
red line in every panel. Headless (Agg backend); reads nothing but the rows
it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PANELS = [
    ("accuracy (graded, metrics only)", [("train/pass@1", "pass@1 (training prompts)"),
                                         ("label/accuracy", "pseudo-label accuracy")]),
    ("label-free signals (the guard's)", [("label/majority_ratio", "majority ratio"),
                                          ("label/flip_rate", "confident votes flipped"),
                                          ("label/first_vote_drift", "votes changed since first visit"),
                                          ("label/consensus_change", "majority ratio change since first visit"),
                                          ("label/vote_alignment", "reward sides with the vote (pairs)")]),
    ("reward", [("reward/mean", "mean reward")]),
    ("entropy", [("train/entropy", "token entropy (nats)")]),
]


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step", 0) > 0]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def collapse_step(rows: Sequence[dict[str, Any]]) -> int | None:
    """The first step the guard fired (`safety/collapse_step`), if it did."""
    steps = [r["safety/collapse_step"] for r in rows if r.get("safety/collapse_step") is not None]
    return int(min(steps)) if steps else None


def plot_run(rows: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110, sharex=True)
    fired = collapse_step(rows)
    for ax, (name, lines) in zip(axes.flat, PANELS):
        for key, label in lines:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label, linewidth=1.5)
        if name.startswith("accuracy"):
            ev = [(r["step"], r["eval/pass@1"]) for r in rows if r.get("eval/pass@1") is not None]
            if ev:
                ax.plot(*zip(*ev), "o--", color="black", label="eval pass@1 (all test prompts)", markersize=5)
            maj = [(r["step"], v) for r in rows for k, v in r.items() if k.startswith("eval/maj@") and
                   not k.endswith("_stderr") and k != "eval/maj@1" and v is not None]
            if maj:
                ax.plot(*zip(*maj), "s:", color="gray", label="eval maj@N", markersize=4)
        if name != "entropy":
            ax.set_ylim(-0.02, 1.02)
        if fired is not None:
            ax.axvline(fired, color="red", linestyle="--", linewidth=1.2, label=f"guard fired (step {fired})")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
