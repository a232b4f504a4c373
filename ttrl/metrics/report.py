"""What a run tells the person at the console: progress lines, the guard's summary, the closing report.

`progress` prints one line per step (about ten a run under CI);
`final_report` plots the run (`training.png`) and prints a before/after
table when the run was evaluated at both ends. Reads metric rows only: no
model, no engine; must never change a row or decide anything about the run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ttrl.metrics import column_mean


def say(msg: str) -> None:
    print(f"ttrl: {msg}", file=sys.stderr, flush=True)


def eval_line(row: dict[str, float]) -> str:
    """"pass@1 0.460, maj@16 0.805" from a row's eval/* keys."""
    return ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/") and "@" in k
                     and not k.endswith("_stderr"))


def guard_summary(sf: Any, vote_signals: bool = True) -> str:
    """The collapse detectors that are on, in a few words."""
    votes = (("vote flips", sf.max_flip_rate), ("vote drift", sf.max_first_vote_drift),
             ("vote drift above its floor", sf.max_excess_drift),
             ("vote flips above their floor", sf.max_excess_flip_rate),
             ("vote consensus", sf.max_consensus_drop), ("reward-vote alignment", sf.min_vote_alignment)) \
        if vote_signals else ()
    on = [name for name, value in (*votes, ("entropy", sf.min_entropy), ("majority ratio", sf.max_majority_ratio),
                                   ("eval drop", sf.max_eval_drop)) if value is not None]
    return "watching " + ", ".join(on) if on else "no detector on"


def progress(step_no: int, total: int, row: dict[str, float], t_loop: float, first: int) -> None:
    """One console line per step; `t_loop` is when `first`, the first step of this process, began."""
    # Under CI (CI=true) about ten lines a run: the first step, every tenth of the run, the last.
    if os.environ.get("CI", "").lower() in ("1", "true") and step_no not in (1, total) \
            and step_no % max(1, total // 10):
        return
    # The rate of the steps this process ran: start-up, the starting eval and
    # the steps a resumed run skipped are not steps to come.
    done = step_no - first + 1
    eta = (time.perf_counter() - t_loop) / max(done, 1) * (total - step_no)
    parts = [f"step {step_no}/{total}"]
    for key, fmt in (("reward/mean", "reward {:.3f}"), ("train/pass@1", "pass@1 {:.3f}"),
                     ("label/accuracy", "label_acc {:.3f}"), ("rollout/tokens_per_s", "{:.0f} tok/s"),
                     ("timing/step", "{:.1f}s/step")):
        if key in row and row[key] is not None:
            parts.append(fmt.format(row[key]))
    parts.append(f"ETA {eta:.0f}s")
    print(" | ".join(parts), file=sys.stderr, flush=True)


def final_report(run_dir: Path, cfg: Any, history: list[dict[str, float]], wall: float, quiet: bool,
                 label_free: bool) -> None:
    """Plot the run; print a before/after table when it was evaluated at both ends."""
    from ttrl.metrics.plot import plot_run

    rows = history
    if (run_dir / "metrics.jsonl").exists():  # a resumed run plots its whole history
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    png = plot_run(rows, run_dir / "training.png", title=f"{cfg.experiment}: {cfg.algorithm.name}, "
                   f"reward={cfg.reward.name}")
    if quiet:
        return
    evals = [r for r in rows if r.get("eval/pass@1") is not None]
    steps = [r for r in rows if r.get("step", 0) > 0 and r.get("label/accuracy") is not None]
    if len(evals) >= 2 and steps:
        print("\n" + "\n".join(_table(cfg, rows, evals, steps, label_free)), file=sys.stderr)
    say(f"done in {wall:.0f}s ({wall / 60:.1f} min); plot {png}; run dir {run_dir}")


def _table(cfg: Any, rows: list[dict], evals: list[dict], steps: list[dict], label_free: bool) -> list[str]:
    first, last = evals[0], evals[-1]
    maj = next((k for k in last if k.startswith("eval/maj@") and k != "eval/maj@1" and "stderr" not in k), None)
    lines = [f"{'':<34}{'before':>10}{'after':>10}",
             f"{'pass@1 (test prompts)':<34}{first['eval/pass@1']:>10.3f}{last['eval/pass@1']:>10.3f}"]
    if maj:
        lines.append(f"{maj[5:] + ' (test prompts)':<34}{first.get(maj, float('nan')):>10.3f}{last[maj]:>10.3f}")
    # One step sees only data.prompts_per_step prompts: average a few steps at each end.
    k = max(1, min(5, len(steps) // 4))
    head, tail = steps[:k], steps[-k:]
    span = f" ({k} steps)" if k > 1 else ""
    for name, key in (("pseudo-label accuracy", "label/accuracy"), ("majority ratio", "label/majority_ratio")):
        lines.append(f"{name + span:<34}{column_mean(head, key):>10.3f}{column_mean(tail, key):>10.3f}")
    lines.append(f"{'training time':<34}{'':>10}{sum(r.get('timing/step') or 0.0 for r in steps):>9.0f}s")
    fired = next((r for r in rows if r.get("safety/collapse_step") is not None), None)
    verdict = (f"fired at step {fired['safety/collapse_step']}: {fired.get('safety/reason', '')}" if fired
               else f"quiet ({guard_summary(cfg.safety, label_free)})")
    lines.append(f"{'collapse guard':<34}{verdict}")
    return lines


__all__ = ["eval_line", "final_report", "guard_summary", "progress", "say"]
