"""`ttrl-compare RUN_DIR...`: runs side by side, from their run dirs alone.

Labels each run by what differs between the configs (e.g. `algorithm=ppo`
vs `algorithm=grpo`) and writes `comparison.md` (final and best pass@1,
maj@N, label accuracy, wall time, tokens/s), `comparison.json` (the same
numbers for scripts) and one PNG per main metric with one line per run. Runs
that differ only by `seed` are also summarised together (mean ± std over
seeds). It never modifies a run dir.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ttrl.report.plots import PLOTTED, metric_curves
from ttrl.report.runs import (
    expand_run_dirs,
    flatten,
    load_run,
    maj_key_of,
    mean_std,
    run_labels,
    series,
    unique_labels,
    without_nan,
)


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers: final and best of the main metrics, steps, wall time, tokens/s."""
    rows = [r for r in run["rows"] if "step" in r and "ser/round" not in r]  # SER rounds precede the policy steps
    train_rows = [r for r in rows if r["step"] > 0]

    def final_best(key: str) -> tuple[float, float]:
        s = [v for _, v in series(rows, key)]
        return (s[-1], max(s)) if s else (math.nan, math.nan)

    maj_key = maj_key_of(rows)
    tps = [r["rollout/tokens_per_s"] for r in train_rows if r.get("rollout/tokens_per_s")]
    return {
        "steps": max((r["step"] for r in rows), default=0),
        "train_pass1": final_best("train/pass@1"),
        "eval_pass1": final_best("eval/pass@1"),
        "maj_key": maj_key[5:] if maj_key else None,
        "maj": final_best(maj_key) if maj_key else (math.nan, math.nan),
        "label_acc": final_best("label/accuracy"),
        "reward": final_best("reward/mean"),
        "wall_s": sum(r.get("timing/step") or 0.0 for r in train_rows),
        "tokens_per_s": sum(tps) / len(tps) if tps else math.nan,
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _maj_name(summaries: list[dict]) -> str:
    return next((s["maj_key"] for s in summaries if s["maj_key"]), "maj@N")


def markdown_table(labels: list[str], summaries: list[dict], dirs: list[Path]) -> str:
    head = ("| run | steps | pass@1 final | pass@1 best | eval pass@1 final | eval pass@1 best | "
            f"{_maj_name(summaries)} final | label acc final | label acc best | reward final | wall (s) | "
            "tokens/s | dir |")
    lines = [head, "|" + "---|" * 13]
    for label, s, d in zip(labels, summaries, dirs):
        lines.append(
            f"| {label} | {s['steps']} | {_fmt(s['train_pass1'][0])} | {_fmt(s['train_pass1'][1])} | "
            f"{_fmt(s['eval_pass1'][0])} | {_fmt(s['eval_pass1'][1])} | {_fmt(s['maj'][0])} | "
            f"{_fmt(s['label_acc'][0])} | {_fmt(s['label_acc'][1])} | {_fmt(s['reward'][0])} | "
            f"{s['wall_s']:.0f} | {_fmt(s['tokens_per_s']).split('.')[0]} | `{d}` |")
    return "\n".join(lines) + "\n"


def seed_table(configs: list[dict], summaries: list[dict]) -> str | None:
    """Mean ± std (sample std) over runs that differ only by seed; None when no two do."""
    seedless = run_labels(configs, ignore=("seed",))
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(seedless):
        groups.setdefault(lab, []).append(i)
    if all(len(ix) < 2 for ix in groups.values()):
        return None
    cols = [("pass@1 final", "train_pass1"), ("eval pass@1 final", "eval_pass1"),
            (f"{_maj_name(summaries)} final", "maj"), ("label acc final", "label_acc"), ("reward final", "reward")]
    lines = ["| runs | seeds | " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for lab, ix in groups.items():
        seeds = ",".join(str(flatten(configs[i]).get("seed")) for i in ix)
        vals = [mean_std([summaries[i][k][0] for i in ix]) for _, k in cols]
        lines.append(f"| {lab} | {seeds} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(runs: list[dict], labels: list[str], out: Path) -> list[Path]:
    """compare_<metric>.png in `out` for every plotted metric some run logged."""
    curves = {key: [(label, series([r for r in run["rows"] if r.get("step", 0) >= 0], key))
                    for run, label in zip(runs, labels)] for key, _ in PLOTTED}
    return metric_curves(curves, out)


def compare(run_dirs: list[Path], out: Path) -> tuple[Path, list[Path]]:
    """Write comparison.md, comparison.json and the plots into `out`; return the table's path and the plots."""
    run_dirs = expand_run_dirs(list(run_dirs))
    runs = [load_run(d) for d in run_dirs]
    configs = [r["config"] for r in runs]
    labels = unique_labels(run_labels(configs), run_dirs)
    summaries = [summarize(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    text = f"# ttrl-compare: {len(runs)} runs\n\n{markdown_table(labels, summaries, run_dirs)}"
    seeds = seed_table(configs, summaries)
    if seeds:
        text += f"\n## Over seeds (mean ± std)\n\n{seeds}"
    md = out / "comparison.md"
    md.write_text(text)
    (out / "comparison.json").write_text(json.dumps(
        [{"label": lab, "dir": str(d), **without_nan(s)} for lab, d, s in zip(labels, run_dirs, summaries)],
        indent=1))
    pngs = plot_metrics(runs, labels, out)
    return md, pngs
