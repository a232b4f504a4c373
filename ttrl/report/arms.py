"""`ttrl-compare SWEEP --arms`: one table and one plot per arm, with the spread across seeds.

An arm is what a comparison compares (PPO against the SER reward model, GRPO
against it, the SER chain, TTRL's majority vote, the oracle): the run's
`logger.wandb.job_type`, or when unset "<algorithm>/<reward>" with "ser+" in
front for a run that trains its own reward model first (`arm_name`, the same
name W&B groups the runs by). Per arm: seeds, eval pass@1 before and after
(mean ± sd), median and worst gain, maj@N after, the reward model's test
accuracy where the arm is rewarded by one, and the worst run's dir. The plot
(`arms.png`) draws each arm's mean eval pass@1 over steps with a band from its
worst to its best seed. It only reads run dirs; it never starts a run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ttrl.metrics.logger import arm_name
from ttrl.report.plots import arms_bands
from ttrl.report.runs import expand_run_dirs, load_run, maj_key_of, mean_std, without_nan


def _rm_meta(run_dir: Path, cfg: dict) -> dict[str, Any] | None:
    """The ttrl_rm.json of the reward model that rewarded this run, if any."""
    reward = cfg.get("reward") or {}
    if reward.get("name") != "reward_model" or not reward.get("path"):
        return None
    path = run_dir / "ser" / "final_rm" if reward["path"] == "ser" else Path(str(reward["path"]))
    meta = path / "ttrl_rm.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    cfg, d = run["config"], Path(run["dir"])
    evals = [r for r in run["rows"] if r.get("eval/pass@1") is not None and "step" in r]
    maj_key = maj_key_of(evals)
    meta = _rm_meta(d, cfg) or {}
    rm_acc = meta.get("test_accuracy", meta.get("held_out_accuracy"))
    out = {"dir": str(d), "arm": arm_name(cfg), "seed": cfg.get("seed"),
           "curve": [(r["step"], r["eval/pass@1"]) for r in evals],
           "pass1_before": evals[0]["eval/pass@1"] if len(evals) >= 2 and evals[0]["step"] == 0 else math.nan,
           "pass1_after": evals[-1]["eval/pass@1"] if len(evals) >= 2 else math.nan,
           "maj_key": maj_key[5:] if maj_key else None,
           "maj_after": evals[-1].get(maj_key, math.nan) if maj_key and evals else math.nan,
           "rm_accuracy": float(rm_acc) if rm_acc is not None else math.nan,
           "rm_accuracy_kind": "test" if "test_accuracy" in meta else "held-out" if meta else None,
           "collapse": any(r.get("safety/collapse_step") is not None for r in run["rows"]),
           # A run still going (or killed) has not had its final eval: its gain is not the arm's.
           "finished": bool(evals) and evals[-1]["step"] >= int((cfg.get("trainer") or {}).get("total_steps", 0))}
    out["gain"] = out["pass1_after"] - out["pass1_before"]
    return out


def summarize(table: list[dict]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in table):
        rs = [r for r in table if r["arm"] == arm]
        scored = [r for r in rs if r["finished"] and not math.isnan(r["gain"])]
        worst = min(scored, key=lambda r: r["gain"]) if scored else None
        out[arm] = {"runs": len(rs), "seeds": sorted(str(r["seed"]) for r in rs),
                    "pass1_before": mean_std([r["pass1_before"] for r in rs]),
                    "pass1_after": mean_std([r["pass1_after"] for r in rs]),
                    "median_gain": statistics.median([r["gain"] for r in scored]) if scored else math.nan,
                    "worst_gain": worst["gain"] if worst else math.nan,
                    "worst_run": worst["dir"] if worst else None,
                    "maj_after": mean_std([r["maj_after"] for r in rs]),
                    "rm_accuracy": mean_std([r["rm_accuracy"] for r in rs]),
                    "guard_fired": sum(r["collapse"] for r in rs),
                    "unfinished": sum(not r["finished"] for r in rs)}
    return out


def _s(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def markdown(table: list[dict], summary: dict[str, dict[str, Any]]) -> str:
    maj = next((r["maj_key"] for r in table if r["maj_key"]), "maj@N")
    lines = [f"| arm | seeds | eval pass@1 before | after | median gain | worst gain | {maj} after | "
             "reward model accuracy | guard fired | worst run |", "|" + "---|" * 10]
    for arm, s in summary.items():
        left = f" ({s['unfinished']} unfinished, not in the gains)" if s["unfinished"] else ""
        lines.append(f"| {arm}{left} | {','.join(s['seeds'])} | {s['pass1_before']} | {s['pass1_after']} | "
                     f"{_s(s['median_gain'])} | {_s(s['worst_gain'])} | {s['maj_after']} | {s['rm_accuracy']} | "
                     f"{s['guard_fired']} of {s['runs']} | `{s['worst_run']}` |")
    kinds = {r["rm_accuracy_kind"] for r in table if r["rm_accuracy_kind"]}
    if kinds:
        lines.append(f"\nReward model accuracy: pairwise, on the RM's {' / '.join(sorted(kinds))} pairs "
                     "(its ttrl_rm.json); mean ± sd over seeds.")
    return "\n".join(lines) + "\n"


def arms_report(run_dirs: list[Path], out: Path) -> Path:
    """Write arms.md, arms.json and arms.png into `out`; return the table's path."""
    table = [run_row(load_run(d)) for d in expand_run_dirs(list(run_dirs))]
    summary = summarize(table)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "arms.md"
    md.write_text(f"# ttrl-compare --arms: {len(table)} runs, {len(summary)} arms\n\n{markdown(table, summary)}")
    clean = [without_nan(r) for r in table]
    (out / "arms.json").write_text(json.dumps({"runs": clean, "arms": summary}, indent=1, default=str))
    arms_bands(table, out / "arms.png")
    return md
