"""`ttrl-compare RUN... --collapse-step [--against RUN...]`: how many steps each run's votes held.

The model-collapse step (URLVR, He et al., 2026, arXiv 2603.08660, "How
Far Can Unsupervised RLVR Scale LLM Training?") is how many steps of an
intrinsic reward a model survives before it collapses: a cheap predictor of
how much RL will gain on it (the paper reports it predicts the gain of full
RL training several times faster than running it). The paper marks the
collapse with graded reward accuracy; here it is label-free: the first step
at which the collapse guard's consensus signals fire, replayed from the
run's votes.jsonl and metrics.jsonl (ttrl.metrics.replay) with the run's own
limits and only those signals on: vote flips, drift from the first (or
anchor) vote, the consensus drop and reward-vote alignment (and the drift
or flips above their sampling floor, where a limit turns them on). Entropy, the
majority ratio, lengths and the graded eval drop are switched off, so the
step reads the same whatever else a run's guard watched, and reads no
ground truth.

Per run: arm, warm start, seed, steps replayed, the collapse step (or
"held N"), the signal that fired, the minutes its steps took, and pass@1
before and after where the run evaluated both. With `--against RUN...`
(full runs, e.g. TTRL on the same warm starts): per warm start, the probe
runs' median collapse step beside the median pass@1 gain of the `--against`
runs, and Spearman's rank correlation between the two over the warm starts
that have both (a run that never collapsed ranks above every run that did,
at its steps + 1). Runs of one warm start, probes and `--against` runs alike,
must have started from the same weights (`model/fingerprint`, a build on
another CPU differs), or it stops with one line naming two of them. Writes
collapse.md and collapse.json; only reads run dirs.

The cheap command that makes a probe run is `ttrl-train experiment=<bed>
debug=collapse_probe [reward=...]` (conf/debug/collapse_probe.yaml).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ttrl.metrics.logger import arm_name
from ttrl.metrics.replay import Replay, replay_votes, safety_section
from ttrl.report.runs import CompareError, expand_run_dirs, jsonl_file, load_run, read_jsonl_rows, without_nan

__all__ = ["CONSENSUS_ONLY", "collapse_report", "consensus_collapse", "run_collapse", "spearman",
           "warm_start"]

# The guard's detectors that are not consensus signals, switched off for the collapse step.
CONSENSUS_ONLY = {"min_entropy": None, "max_majority_ratio": None, "min_response_length": None,
                  "max_response_length": None, "max_eval_drop": None}


def consensus_collapse(vote_rows: Iterable[dict[str, Any]], metric_rows: Iterable[dict[str, Any]],
                       safety: Any = None, limits: dict[str, Any] | None = None,
                       n_votes: int | None = None, source: str = "the run's config") -> Replay:
    """The guard replayed with the consensus signals only.

    Their limits: `safety`'s (today's defaults where it has none), then
    `limits` over them (e.g. {"max_excess_drift": 0.15}, to judge old runs
    by a new limit); `n_votes` gives older vote rows a drift floor.
    """
    checked = safety_section(safety, source, **((limits or {}) | CONSENSUS_ONLY))
    return replay_votes(vote_rows, checked, metric_rows, n_votes)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their average rank); None under 3 pairs or with no spread."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def warm_start(cfg: dict[str, Any]) -> str:
    """Which starting model a run trained: model.path; for the untrained tiny its seed and shape; for the
    built tiny-arith its seeds and recipe.

    The recipe's tag is the build's own cache name (`tiny-arith-<hash>`), so
    runs of one warm start match across code versions whose configs gained
    keys that do not change the build (the warm start's check, off on the
    hard bed). A config too partial to name the build is tagged by a hash of
    what it holds.
    """
    model = cfg.get("model") or {}
    path = str(model.get("path"))
    if path == "tiny":
        # The untrained tiny model: its seed and shape make it, so runs of two seeds are two warm starts.
        tiny = dict(model.get("tiny") or {})
        seed = tiny.pop("seed", None)
        return f"tiny {seed} #{_tag(tiny)}"
    if path != "tiny-arith":
        return path
    tiny, ws = model.get("tiny") or {}, model.get("warmstart") or {}
    synth = (cfg.get("data") or {}).get("synthetic") or {}
    try:
        from omegaconf import OmegaConf

        from ttrl.models.tiny import spec_hash
        from ttrl.models.warmstart import warmstart_spec

        tag = spec_hash(warmstart_spec(OmegaConf.create(model), OmegaConf.create(synth)))[:6]
    except Exception:  # noqa: BLE001 -- any key the build needs is missing: fall back to the raw config
        tag = _tag([tiny, ws, synth.get("terms"), synth.get("digits")])
    return f"tiny-arith {tiny.get('seed')}:{ws.get('seed')} #{tag}"


def _tag(obj: Any) -> str:
    """Six hex digits naming a plain config value (dict keys sorted), stable across processes."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


def fingerprint(run: dict[str, Any]) -> str | None:
    """The run's starting weights' fingerprint (`model/fingerprint`, logged with its first step), if it has one."""
    return next((r["model/fingerprint"] for r in run["rows"] if isinstance(r.get("model/fingerprint"), str)), None)


def one_weights_per_warm_start(runs: list[dict[str, Any]]) -> None:
    """Raise CompareError when two runs of one warm start (`warm_start`) started from different weights.

    A warm start is built where it runs, and the same recipe and seeds give
    other weights on another CPU, so a sweep continued on another machine
    would put two models under one name. Runs logged before fingerprints
    existed are not checked.
    """
    seen: dict[str, tuple[str, str]] = {}
    for run in runs:
        fp = fingerprint(run)
        if fp is None:
            continue
        ws = warm_start(run["config"])
        first = seen.setdefault(ws, (fp, str(run["dir"])))
        if first[0] != fp:
            raise CompareError(
                f"{run['dir']} and {first[1]} are both warm start {ws} but started from different weights "
                f"(model/fingerprint {fp} and {first[0]}): built on different machines? Report them apart")


def run_collapse(run: dict[str, Any], limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run's collapse step and outcome, from a `load_run` dict (its dir must hold votes.jsonl);
    `limits` over the run's own safety limits."""
    d, cfg, rows = Path(run["dir"]), run["config"], run["rows"]
    votes = jsonl_file(d, "votes.jsonl")
    if votes is None:
        raise CompareError(f"{d}: no votes.jsonl, so no vote signals to replay (runs write it since the guard "
                           f"replay; rerun it)")
    vote_rows = read_jsonl_rows(votes)
    n_votes = (cfg.get("rollout") or {}).get("n_votes")
    replay = consensus_collapse(vote_rows, rows, cfg.get("safety"), limits, n_votes, str(d / "config.yaml"))
    evals = [r for r in rows if r.get("eval/pass@1") is not None and "step" in r]
    before = evals[0]["eval/pass@1"] if evals and evals[0]["step"] == 0 else math.nan
    after = evals[-1]["eval/pass@1"] if len(evals) >= 2 and evals[-1]["step"] > 0 else math.nan
    signal = replay.reason.split(" averaged")[0] if replay.reason else None
    return {"dir": str(d), "arm": arm_name(cfg), "warm_start": warm_start(cfg), "seed": cfg.get("seed"),
            "reward": (cfg.get("reward") or {}).get("name"), "steps": len(replay.rows),
            "collapse_step": replay.fired_at, "signal": signal, "reason": replay.reason,
            "minutes": sum(float(r.get("timing/step") or 0.0) for r in rows) / 60,
            "pass1_before": before, "pass1_after": after, "gain": after - before}


def survived(row: dict[str, Any]) -> int:
    """The collapse step, or steps + 1 for a run whose votes held: the number the rank correlation uses."""
    return row["collapse_step"] if row["collapse_step"] is not None else row["steps"] + 1


def by_warm_start(probes: list[dict], against: list[dict]) -> tuple[list[dict], float | None]:
    """Per warm start: the probes' median survival and the `against` runs' median gain; their Spearman rho."""
    out = []
    for ws in dict.fromkeys(r["warm_start"] for r in probes + against):
        p = [survived(r) for r in probes if r["warm_start"] == ws]
        g = [r["gain"] for r in against if r["warm_start"] == ws and not math.isnan(r["gain"])]
        out.append({"warm_start": ws, "probes": len(p), "collapse_step": statistics.median(p) if p else None,
                    "held_all": bool(p) and all(r["collapse_step"] is None for r in probes if r["warm_start"] == ws),
                    "runs": len(g), "median_gain": statistics.median(g) if g else math.nan})
    both = [r for r in out if r["collapse_step"] is not None and not math.isnan(r["median_gain"])]
    return out, spearman([r["collapse_step"] for r in both], [r["median_gain"] for r in both])


def _f(x: float, fmt: str = "{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(table: list[dict], per_ws: list[dict] | None = None, rho: float | None = None) -> str:
    lines = ["| run | arm | warm start | seed | steps | collapse step | signal | minutes (steps) | "
             "pass@1 before | after |", "|" + "---|" * 10]
    for r in table:
        step = f"{r['collapse_step']}" if r["collapse_step"] is not None else f"held {r['steps']}"
        lines.append(f"| `{Path(r['dir']).name}` | {r['arm']} | {r['warm_start']} | {r['seed']} | {r['steps']} | "
                     f"{step} | {r['signal'] or '–'} | {r['minutes']:.1f} | {_f(r['pass1_before'])} | "
                     f"{_f(r['pass1_after'])} |")
    if per_ws is not None:
        lines += ["", "| warm start | probes | median collapse step | --against runs | median pass@1 gain |",
                  "|" + "---|" * 5]
        for w in per_ws:
            step = "–" if w["collapse_step"] is None else (
                f"held ({w['collapse_step']:g})" if w["held_all"] else f"{w['collapse_step']:g}")
            lines.append(f"| {w['warm_start']} | {w['probes']} | {step} | {w['runs']} | "
                         f"{_f(w['median_gain'], '{:+.3f}')} |")
        n = sum(1 for w in per_ws if w["collapse_step"] is not None and not math.isnan(w["median_gain"]))
        lines.append(f"\nSpearman rank correlation of the collapse step with the gain over {n} warm starts: "
                     + ("– (needs 3 or more with both, and some spread)" if rho is None else f"{rho:+.2f}"))
    lines.append("\nCollapse step: the first step at which the guard's consensus signals (vote flips, drift, "
                 "consensus drop, reward-vote alignment; drift and flips above their floor when limited) fired, replayed with the run's limits; \"held N\": "
                 "they never fired in its N steps. Minutes: the steps' own time (start-up and evals not counted).")
    return "\n".join(lines) + "\n"


def collapse_report(run_dirs: list[Path], out: Path, against: list[Path] | None = None,
                    limits: dict[str, Any] | None = None) -> Path:
    """Write collapse.md and collapse.json into `out`; return the table's path."""
    runs = [load_run(d) for d in expand_run_dirs(list(run_dirs))]
    others = [load_run(d) for d in expand_run_dirs(list(against))] if against else []
    one_weights_per_warm_start(runs + others)
    table = [run_collapse(r, limits) for r in runs]
    per_ws, rho = None, None
    if against:
        per_ws, rho = by_warm_start(table, [run_collapse(r) for r in others])
    out.mkdir(parents=True, exist_ok=True)
    md = out / "collapse.md"
    md.write_text(f"# ttrl-compare --collapse-step: {len(table)} runs\n\n{markdown(table, per_ws, rho)}")
    payload = {"runs": [without_nan(r) for r in table], "spearman": rho,
               "warm_starts": [without_nan(w) for w in per_ws] if per_ws is not None else None}
    (out / "collapse.json").write_text(json.dumps(payload, indent=1, default=str))
    return md
