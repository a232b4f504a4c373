"""`ttrl-compare SWEEP --arms`: one table and one plot per arm, with the spread across seeds.

An arm is what a comparison compares (PPO against the SER reward model, GRPO
against it, the SER chain, TTRL's majority vote, the oracle): the run's
`logger.wandb.job_type`, or when unset "<algorithm>/<reward>" with "ser+" in
front for a run that trains its own reward model first (`arm_name`, the same
name W&B groups the runs by). Per arm: seeds, eval pass@1 before and after
(mean ± sd), median and worst gain, maj@N after and its median change, the
pseudo-labels' accuracy over the first and the last steps, the reward model's
test accuracy where the arm is rewarded by one, how often the guard fired,
the median model-collapse step (`ttrl.report.collapse`, replayed from the
run's votes), how many runs ended with pass@1 above their own starting maj@N
(TTRL's headline claim), and the worst run's name (arms.json has its path).
Under it, the guard's record: every run where it fired or maj@N fell by `MAJ_FALL` or more, with the
steps between the firing and that fall (the warning's lead) and the runs it
fired on that ended up gaining (false alarms). The plot (`arms.png`) draws each
arm's mean eval pass@1 over steps with a band from its worst to its best seed.
Runs of one warm start must have started from the same weights
(`model/fingerprint`), or it stops with one line naming two of them.
It only reads run dirs; it never starts a run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ttrl.metrics.logger import arm_name
from ttrl.report.collapse import one_weights_per_warm_start, run_collapse
from ttrl.report.plots import arms_bands
from ttrl.report.runs import (
    CompareError,
    expand_run_dirs,
    jsonl_file,
    load_run,
    maj_key_of,
    mean_std,
    without_nan,
)

# A fall of maj@N this large below its start is what the guard is meant to warn of ahead of.
MAJ_FALL = 0.05
# Pseudo-label accuracy "first" and "last": the mean over this many steps at each end (one step is 16 prompts).
LABEL_STEPS = 5


def _rm_meta(run_dir: Path, cfg: dict) -> dict[str, Any] | None:
    """The ttrl_rm.json of the reward model that rewarded this run, if any."""
    reward = cfg.get("reward") or {}
    if reward.get("name") != "reward_model" or not reward.get("path"):
        return None
    path = run_dir / "ser" / "final_rm" if reward["path"] == "ser" else Path(str(reward["path"]))
    meta = path / "ttrl_rm.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _collapse_step(run: dict[str, Any], limits: dict[str, Any] | None = None) -> int | None | float:
    """The run's consensus-only collapse step (None: its votes held), NaN where it has no votes to replay."""
    if jsonl_file(Path(run["dir"]), "votes.jsonl") is None:
        return math.nan
    try:
        return run_collapse(run, limits)["collapse_step"]
    except CompareError:
        return math.nan


def run_row(run: dict[str, Any], limits: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg, d = run["config"], Path(run["dir"])
    evals = [r for r in run["rows"] if r.get("eval/pass@1") is not None and "step" in r]
    maj_key = maj_key_of(evals)
    labels = [r["label/accuracy"] for r in run["rows"]
              if isinstance(r.get("label/accuracy"), (int, float)) and r.get("step") is not None]
    fired = next((r["safety/collapse_step"] for r in run["rows"] if r.get("safety/collapse_step") is not None),
                 None)
    meta = _rm_meta(d, cfg) or {}
    rm_acc = meta.get("test_accuracy", meta.get("held_out_accuracy"))
    out = {"dir": str(d), "arm": arm_name(cfg), "seed": cfg.get("seed"),
           "curve": [(r["step"], r["eval/pass@1"]) for r in evals],
           "pass1_before": evals[0]["eval/pass@1"] if len(evals) >= 2 and evals[0]["step"] == 0 else math.nan,
           "pass1_after": evals[-1]["eval/pass@1"] if len(evals) >= 2 else math.nan,
           "maj_key": maj_key[5:] if maj_key else None,
           "maj_after": evals[-1].get(maj_key, math.nan) if maj_key and evals else math.nan,
           "maj_before": (evals[0].get(maj_key, math.nan) if maj_key and len(evals) >= 2 and evals[0]["step"] == 0
                          else math.nan),
           "label_first": _mean(labels[:LABEL_STEPS]), "label_last": _mean(labels[-LABEL_STEPS:]),
           "guard_step": fired, "collapse_step": _collapse_step(run, limits),
           "rm_accuracy": float(rm_acc) if rm_acc is not None else math.nan,
           "rm_accuracy_kind": "test" if "test_accuracy" in meta else "held-out" if meta else None,
           "collapse": any(r.get("safety/collapse_step") is not None for r in run["rows"]),
           # A run still going (or killed) has not had its final eval: its gain is not the arm's.
           "finished": bool(evals) and evals[-1]["step"] >= int((cfg.get("trainer") or {}).get("total_steps", 0))}
    out["gain"] = out["pass1_after"] - out["pass1_before"]
    out["maj_change"] = out["maj_after"] - out["maj_before"]
    # The first eval at which maj@N stood MAJ_FALL or more below its start: what a warning should come before.
    fall = [r["step"] for r in evals[1:] if maj_key and r.get(maj_key) is not None
            and r[maj_key] <= out["maj_before"] - MAJ_FALL + 1e-9]
    out["maj_fall_step"] = fall[0] if fall else None
    out["above_start_maj"] = None if math.isnan(out["maj_before"]) else out["pass1_after"] > out["maj_before"]
    return out


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


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
                    "maj_change": _median([r["maj_change"] for r in scored]),
                    "worst_maj_change": min((r["maj_change"] for r in scored if not math.isnan(r["maj_change"])),
                                            default=math.nan),
                    "label_first": _median([r["label_first"] for r in rs]),
                    "label_last": _median([r["label_last"] for r in rs]),
                    # A run whose votes held counts at its steps + 1 would need its steps; "held" rows are
                    # counted apart instead, and the median is over the runs that collapsed.
                    "collapse_step": _median([r["collapse_step"] for r in rs if isinstance(r["collapse_step"], int)]),
                    "collapse_held": sum(r["collapse_step"] is None for r in rs),
                    "above_start_maj": sum(bool(r["above_start_maj"]) for r in scored),
                    "with_start_maj": sum(r["above_start_maj"] is not None for r in scored),
                    "rm_accuracy": mean_std([r["rm_accuracy"] for r in rs]),
                    "guard_fired": sum(r["collapse"] for r in rs),
                    "unfinished": sum(not r["finished"] for r in rs)}
    return out


def _s(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def _f(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3f}"


def _step(s: dict[str, Any]) -> str:
    held = f"held in {s['collapse_held']}" if s["collapse_held"] else ""
    if math.isnan(s["collapse_step"]):
        return held or "–"
    return f"{s['collapse_step']:g}" + (f" ({held})" if held else "")


def guard_rows(table: list[dict]) -> list[dict[str, Any]]:
    """The runs where the guard fired or maj@N fell by MAJ_FALL: when each happened, the lead, a false alarm."""
    out = []
    for r in table:
        if r["guard_step"] is None and r["maj_fall_step"] is None:
            continue
        lead = (r["maj_fall_step"] - r["guard_step"]
                if r["guard_step"] is not None and r["maj_fall_step"] is not None else None)
        # Fired on a run that ended up gaining, its maj@N not fallen: the warning was not needed.
        false_alarm = (r["guard_step"] is not None and r["finished"] and r["gain"] > 0
                       and r["maj_fall_step"] is None)
        out.append({"dir": r["dir"], "arm": r["arm"], "guard_step": r["guard_step"],
                    "maj_fall_step": r["maj_fall_step"], "lead": lead, "gain": r["gain"],
                    "maj_change": r["maj_change"], "false_alarm": false_alarm})
    return out


def markdown(table: list[dict], summary: dict[str, dict[str, Any]]) -> str:
    maj = next((r["maj_key"] for r in table if r["maj_key"]), "maj@N")
    lines = [f"| arm | seeds | eval pass@1 before | after | median gain | worst gain | {maj} after | "
             f"median {maj} change (worst) | label acc first -> last | ends above its start {maj} | "
             "reward model accuracy | guard fired | collapse step | worst run |", "|" + "---|" * 14]
    for arm, s in summary.items():
        left = f" ({s['unfinished']} unfinished, not in the gains)" if s["unfinished"] else ""
        above = f"{s['above_start_maj']} of {s['with_start_maj']}" if s["with_start_maj"] else "–"
        lines.append(f"| {arm}{left} | {','.join(s['seeds'])} | {s['pass1_before']} | {s['pass1_after']} | "
                     f"{_s(s['median_gain'])} | {_s(s['worst_gain'])} | {s['maj_after']} | "
                     f"{_s(s['maj_change'])} ({_s(s['worst_maj_change'])}) | "
                     f"{_f(s['label_first'])} -> {_f(s['label_last'])} | {above} | "
                     f"{s['rm_accuracy']} | {s['guard_fired']} of {s['runs']} | {_step(s)} | "
                     f"`{Path(s['worst_run']).name if s['worst_run'] else '–'}` |")
    lines.append(f"\nLabel acc: the pseudo-labels' agreement with the ground truth (a metric, never a reward), mean "
                 f"of the first and of the last {LABEL_STEPS} steps, median over runs. Collapse step: the first "
                 "step the guard's consensus signals fire, replayed from the run's votes (`--collapse-step`), "
                 "median over the runs that collapsed. Ends above its start: final pass@1 above the run's own "
                 f"{maj} at step 0.")
    guard = guard_rows(table)
    if guard:
        lines += ["", f"The guard: runs where it fired or {maj} fell {MAJ_FALL:.2f} or more below its start",
                  "", f"| run | arm | guard fired at step | {maj} fell at step | lead (steps) | pass@1 gain | "
                  f"{maj} change | false alarm |", "|" + "---|" * 8]
        for g in guard:
            lines.append(f"| `{Path(g['dir']).name}` | {g['arm']} | {g['guard_step'] if g['guard_step'] is not None else '–'} | "
                         f"{g['maj_fall_step'] if g['maj_fall_step'] is not None else '–'} | "
                         f"{g['lead'] if g['lead'] is not None else '–'} | {_s(g['gain'])} | "
                         f"{_s(g['maj_change'])} | {'yes' if g['false_alarm'] else 'no'} |")
        fired = [g for g in guard if g["guard_step"] is not None]
        missed = [g for g in guard if g["guard_step"] is None]
        leads = [g["lead"] for g in guard if g["lead"] is not None]
        lines.append(f"\nFired on {len(fired)} runs ({sum(g['false_alarm'] for g in fired)} false alarms: the run "
                     f"gained, its {maj} held); {maj} fell on {len(leads) + len(missed)} runs, with the guard ahead by "
                     + (f"{statistics.median(leads):g} steps (median; least {min(leads)})" if leads else "–")
                     + f", silent on {len(missed)}. {maj} is measured at the evals only, so a lead is "
                     "counted to the first eval that shows the fall.")
    kinds = {r["rm_accuracy_kind"] for r in table if r["rm_accuracy_kind"]}
    if kinds:
        lines.append(f"\nReward model accuracy: pairwise, on the RM's {' / '.join(sorted(kinds))} pairs "
                     "(its ttrl_rm.json); mean ± sd over seeds.")
    return "\n".join(lines) + "\n"


def arms_report(run_dirs: list[Path], out: Path, limits: dict[str, Any] | None = None) -> Path:
    """Write arms.md, arms.json and arms.png into `out`; return the table's path.

    `limits` (safety keys) change only the replayed collapse step, not the
    guard's record, which is what each run's own guard logged.
    """
    runs = [load_run(d) for d in expand_run_dirs(list(run_dirs))]
    one_weights_per_warm_start(runs)
    table = [run_row(r, limits) for r in runs]
    summary = summarize(table)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "arms.md"
    md.write_text(f"# ttrl-compare --arms: {len(table)} runs, {len(summary)} arms\n\n{markdown(table, summary)}")
    clean = [without_nan(r) for r in table]
    (out / "arms.json").write_text(json.dumps({"runs": clean, "arms": summary}, indent=1, default=str))
    arms_bands(table, out / "arms.png")
    return md
