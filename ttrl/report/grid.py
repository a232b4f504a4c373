"""`ttrl-compare SWEEP --grid`: the demo grid's before/after table and plot.

Reads run dirs (as `experiments/sweeps/demo_grid.sh` lays them out, or any
runs evaluated at their start and end) and writes `grid.md`, `grid.json` and
`grid.png`: per run its warm start (model.tiny.seed:model.warmstart.seed),
seed and arm (ttrl, oracle, random, from `reward.name`), eval pass@1 and
maj@N before and after, pseudo-label accuracy over its first and last steps,
the collapse guard's verdict, and whether it meets the demo's bar; then the
summary over label-free runs (median, spread, worst) beside the oracle and
the random control. Runs of one warm start must have started from the same
weights (`model/fingerprint`), or it stops with one line naming two of them.
It only reads run dirs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ttrl.report.collapse import one_weights_per_warm_start
from ttrl.report.plots import grid_before_after
from ttrl.report.runs import expand_run_dirs, load_run, maj_key_of, without_nan

ARMS = {"majority_vote": "ttrl", "ground_truth": "oracle", "random": "random"}
ORDER = {"ttrl": 0, "oracle": 1, "random": 2}  # how arms are listed; any other reward comes last
# The bar every label-free demo run must meet (docs/results.md, the demo across warm starts;
# issue "the demo gains on every machine").
MIN_GAIN = 0.10
MAX_MAJ_DROP = 0.02


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("eval/pass@1") is not None]


def _mean(rows: list[dict], key: str) -> float:
    xs = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(xs) / len(xs) if xs else math.nan


def run_row(run: dict[str, Any], replay_guard: bool = False) -> dict[str, Any]:
    """One run's line. `replay_guard`: the guard's verdict replayed on the run's
    votes with today's default limits (ttrl.metrics.replay) instead of the one the
    run logged, so that runs from before a guard change are judged alike."""
    cfg, rows = run["config"], [r for r in run["rows"] if "step" in r]
    model = cfg.get("model", {})
    tiny, ws = model.get("tiny", {}) or {}, model.get("warmstart", {}) or {}
    evals, maj = _evals(rows), maj_key_of(rows)
    steps = [r for r in rows if r["step"] > 0 and r.get("label/accuracy") is not None]
    k = max(1, min(5, len(steps) // 4))
    fired = [r for r in rows if r.get("safety/collapse_step") is not None]
    out = {
        "dir": str(run["dir"]),
        "arm": ARMS.get(cfg.get("reward", {}).get("name"), cfg.get("reward", {}).get("name")),
        "warm_start": f"{tiny.get('seed')}:{ws.get('seed')}",
        "seed": cfg.get("seed"),
        "steps": max((r["step"] for r in rows), default=0),
        "pass1_before": evals[0]["eval/pass@1"] if len(evals) >= 2 and evals[0]["step"] == 0 else math.nan,
        "pass1_after": evals[-1]["eval/pass@1"] if len(evals) >= 2 else math.nan,
        "maj_key": maj[5:] if maj else None,
        "maj_before": evals[0].get(maj, math.nan) if maj and len(evals) >= 2 else math.nan,
        "maj_after": evals[-1].get(maj, math.nan) if maj and len(evals) >= 2 else math.nan,
        "maj_min": min((r[maj] for r in evals if r.get(maj) is not None), default=math.nan) if maj else math.nan,
        "label_acc_first": _mean(steps[:k], "label/accuracy"),
        "label_acc_last": _mean(steps[-k:], "label/accuracy"),
        "guard_step": fired[0]["safety/collapse_step"] if fired else None,
        "guard_reason": fired[0].get("safety/reason") if fired else None,
    }
    reward = cfg.get("reward", {}).get("name")
    if replay_guard and reward != "ground_truth" and (Path(run["dir"]) / "votes.jsonl").exists():
        from ttrl.metrics.replay import replay_run

        replayed = replay_run(run["dir"], own_config=False)
        out["guard_step"], out["guard_reason"] = replayed.fired_at, replayed.reason
        out["guard_replayed"] = True
    out["gain"] = out["pass1_after"] - out["pass1_before"]
    out["maj_change"] = out["maj_after"] - out["maj_before"]
    out["meets_bar"] = bool(out["gain"] >= MIN_GAIN and out["maj_change"] >= -MAX_MAJ_DROP)
    return out


def _f(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def summarize(table: list[dict]) -> dict[str, Any]:
    oracle = {r["warm_start"]: r["gain"] for r in table if r["arm"] == "oracle" and not math.isnan(r["gain"])}
    for r in table:
        o = oracle.get(r["warm_start"])
        r["share_of_oracle"] = r["gain"] / o if o and r["arm"] != "oracle" else math.nan
    out: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in table}):
        rs = [r for r in table if r["arm"] == arm and not math.isnan(r["gain"])]
        if not rs:
            continue
        gains = [r["gain"] for r in rs]
        worst = min(rs, key=lambda r: r["gain"])
        shares = [r["share_of_oracle"] for r in rs if not math.isnan(r["share_of_oracle"])]
        out[arm] = {
            "runs": len(rs), "median_gain": statistics.median(gains), "min_gain": min(gains),
            "max_gain": max(gains), "worst_run": worst["dir"],
            "worst_maj_change": min(r["maj_change"] for r in rs),
            "meets_bar": sum(r["meets_bar"] for r in rs),
            "median_share_of_oracle": statistics.median(shares) if shares else math.nan,
            "guard_fired": sum(r["guard_step"] is not None for r in rs),
        }
    return out


def markdown(table: list[dict], summary: dict[str, Any]) -> str:
    maj = next((r["maj_key"] for r in table if r["maj_key"]), "maj@N")
    lines = [f"| arm | warm start | seed | pass@1 before | after | gain | {maj} before | after | change | "
             "label acc first → last | guard | bar |", "|" + "---|" * 12]
    for r in sorted(table, key=lambda r: (ORDER.get(r["arm"], 3), r["warm_start"], str(r["seed"]))):
        guard = (f"fired at {r['guard_step']}" if r["guard_step"] is not None
                 else "off (graded reward)" if r["arm"] == "oracle" else "quiet")
        if r.get("guard_replayed"):
            guard += " (replayed)"
        bar = ("yes" if r["meets_bar"] else "**no**") if r["arm"] == "ttrl" else ""
        lines.append(f"| {r['arm']} | {r['warm_start']} | {r['seed']} | {_f(r['pass1_before'])} | "
                     f"{_f(r['pass1_after'])} | {_f(r['gain'], True)} | {_f(r['maj_before'])} | "
                     f"{_f(r['maj_after'])} | {_f(r['maj_change'], True)} | {_f(r['label_acc_first'])} → "
                     f"{_f(r['label_acc_last'])} | {guard} | {bar} |")
    lines += ["", "| arm | runs | median gain | worst gain | best gain | worst maj change | meet the bar | "
              "median share of the oracle's gain | guard fired |", "|" + "---|" * 9]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['runs']} | {_f(s['median_gain'], True)} | {_f(s['min_gain'], True)} | "
                     f"{_f(s['max_gain'], True)} | {_f(s['worst_maj_change'], True)} | "
                     f"{s['meets_bar'] if arm == 'ttrl' else '–'} | {_f(s['median_share_of_oracle'])} | "
                     f"{s['guard_fired']} |")
    lines.append(f"\nThe bar (ttrl runs): eval pass@1 gain >= +{MIN_GAIN:.2f} and {maj} no lower than its start "
                 f"minus {MAX_MAJ_DROP:.2f}.")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], out: Path) -> Path:
    """grid.png: runs grouped by warm start, then arm, then seed."""
    runs = sorted(table, key=lambda r: (r["warm_start"], ORDER.get(r["arm"], 3), str(r["seed"])))
    return grid_before_after(runs, out)


def grid_report(paths: list[Path], out: Path, replay_guard: bool = False) -> Path:
    """Write grid.md, grid.json and grid.png into `out`; return the table's path."""
    runs = [load_run(d) for d in expand_run_dirs(paths)]
    one_weights_per_warm_start(runs)
    table = [run_row(r, replay_guard) for r in runs]
    summary = summarize(table)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "grid.md"
    md.write_text(f"# Demo grid: {len(table)} runs\n\n" + markdown(table, summary))
    clean = [without_nan(r) for r in table]
    (out / "grid.json").write_text(json.dumps({"runs": clean, "summary": summary}, indent=1, default=str))
    plot(table, out / "grid.png")
    return md
