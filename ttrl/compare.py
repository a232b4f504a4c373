"""`ttrl-compare RUN_DIR... [--out DIR]`: runs side by side, from their run dirs alone.

Reads each run's `config.yaml` and `metrics.jsonl` (no W&B needed), labels
each run by what differs between the configs (e.g. `algorithm=ppo` vs
`algorithm=grpo`), and writes a markdown table (final and best pass@1,
maj@N, label accuracy, wall time, tokens/s) and one PNG per main metric with
one line per run. A sweep dir (`multirun/...`) stands for all its jobs. Runs
that differ only by `seed` are also summarised together (mean ± std over
seeds). `comparison.json` holds the same numbers for scripts. It never
modifies a run dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

PLOTTED = [
    ("train/pass@1", "pass@1 on the step's prompts"),
    ("eval/pass@1", "eval pass@1"),
    ("label/accuracy", "pseudo-label accuracy"),
    ("label/majority_ratio", "majority ratio"),
    ("reward/mean", "mean reward"),
    ("train/entropy", "policy entropy"),
    ("train/kl", "KL to the reference policy"),
]
# Keys that differ between any two runs without saying anything about them.
# `run` is what the W&B logger adds (run dir, overrides).
_IGNORED = ("hydra", "logger", "trainer.resume", "run")


class CompareError(ValueError):
    pass


def load_run(run_dir: Path) -> dict[str, Any]:
    cfg_file, met_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: no such directory")
    if not cfg_file.exists():
        raise CompareError(f"{run_dir}: no config.yaml, so not a ttrl run dir (a run dir holds config.yaml and"
                           " metrics.jsonl; a sweep dir holds run dirs)")
    if not met_file.exists():
        raise CompareError(f"{run_dir}: no metrics.jsonl (the run stopped before its first step?)")
    lines = met_file.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; anything else is damage.
            if i != last:
                raise CompareError(f"{met_file}:{i + 1}: not valid JSON") from None
    try:
        config = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise CompareError(f"{cfg_file}: not valid YAML ({str(err).splitlines()[0]})") from None
    return {"dir": run_dir, "config": config, "rows": rows}


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs as given; a sweep dir (no config.yaml, run dirs inside) becomes its jobs, in job order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and not (p / "config.yaml").exists():
            jobs = [d for d in p.iterdir() if d.is_dir() and (d / "config.yaml").exists()]
            if jobs:
                def job_key(d: Path) -> tuple[int, str]:
                    head = d.name.split("_", 1)[0]
                    return (int(head) if head.isdigit() else 1 << 30, d.name)

                out += sorted(jobs, key=job_key)
                continue
        out.append(p)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def run_labels(configs: list[dict], ignore: tuple[str, ...] = ()) -> list[str]:
    """Label each run by the config values that differ between the runs."""
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    skip = _IGNORED + tuple(ignore)
    differ = [k for k in keys if not (k in skip or k.startswith(tuple(i + "." for i in skip)))
              and len({json.dumps(f.get(k)) for f in flat}) > 1]
    # `algorithm.name=ppo` says it all; its consequences (algorithm.advantage=gae, ...) are noise.
    groups_named = {k.rsplit(".", 1)[0] for k in differ if k.endswith(".name")}
    shown = [k for k in differ if k.endswith(".name") or k.rsplit(".", 1)[0] not in groups_named]
    labels = []
    for f in flat:
        parts = []
        for k in shown:
            key = k[:-5] if k.endswith(".name") else k
            parts.append(f"{key}={f.get(k)}")
        labels.append(" ".join(parts) or "(identical configs)")
    return labels


def _unique(labels: list[str], dirs: list[Path]) -> list[str]:
    """Two runs with one label (identical configs) get their dir names added."""
    return [f"{lab} [{d.name}]" if labels.count(lab) > 1 else lab for lab, d in zip(labels, dirs)]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step") is not None]


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in run["rows"] if "step" in r and "ser/round" not in r]  # SER rounds precede the policy steps
    train_rows = [r for r in rows if r["step"] > 0]

    def final_best(key: str) -> tuple[float, float]:
        s = [v for _, v in _series(rows, key)]
        return (s[-1], max(s)) if s else (math.nan, math.nan)

    maj_keys = sorted({k for r in rows for k in r if k.startswith("eval/maj@") and "stderr" not in k
                       and k != "eval/maj@1"}, key=lambda k: int(k.split("@")[1]))
    tps = [r["rollout/tokens_per_s"] for r in train_rows if r.get("rollout/tokens_per_s")]
    return {
        "steps": max((r["step"] for r in rows), default=0),
        "train_pass1": final_best("train/pass@1"),
        "eval_pass1": final_best("eval/pass@1"),
        "maj_key": maj_keys[-1][5:] if maj_keys else None,
        "maj": final_best(maj_keys[-1]) if maj_keys else (math.nan, math.nan),
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


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd:.3f}"


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
        seeds = ",".join(str(_flatten(configs[i]).get("seed")) for i in ix)
        vals = [mean_std([summaries[i][k][0] for i in ix]) for _, k in cols]
        lines.append(f"| {lab} | {seeds} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(runs: list[dict], labels: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for key, title in PLOTTED:
        series = [(label, _series([r for r in run["rows"] if r.get("step", 0) >= 0], key))
                  for run, label in zip(runs, labels)]
        if not any(s for _, s in series):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for label, s in series:
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def compare(run_dirs: list[Path], out: Path) -> tuple[Path, list[Path]]:
    """Write comparison.md, comparison.json and the plots into `out`; return the table's path and the plots."""
    run_dirs = expand_run_dirs(list(run_dirs))
    runs = [load_run(d) for d in run_dirs]
    configs = [r["config"] for r in runs]
    labels = _unique(run_labels(configs), run_dirs)
    summaries = [summarize(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    text = f"# ttrl-compare: {len(runs)} runs\n\n{markdown_table(labels, summaries, run_dirs)}"
    seeds = seed_table(configs, summaries)
    if seeds:
        text += f"\n## Over seeds (mean ± std)\n\n{seeds}"
    md = out / "comparison.md"
    md.write_text(text)
    (out / "comparison.json").write_text(json.dumps(
        [{"label": lab, "dir": str(d), **{k: _jsonable(v) for k, v in s.items()}}
         for lab, d, s in zip(labels, run_dirs, summaries)], indent=1))
    pngs = plot_metrics(runs, labels, out)
    return md, pngs


def _wandb_runs(group: str, project: str, entity: str | None, dest: Path) -> list[Path]:
    """Pull a W&B group's runs into local run dirs (config.yaml + metrics.jsonl)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    dirs = []
    for run in api.runs(path, filters={"group": group}):
        d = dest / run.name.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(dict(run.config)))
        with (d / "metrics.jsonl").open("w") as fh:
            for row in run.scan_history():
                # ttrl logs its own `step`; older runs only have W&B's `_step`.
                step = row.get("step", row.get("_step"))
                row = {k: v for k, v in row.items() if not k.startswith("_")} | {"step": step}
                fh.write(json.dumps(row) + "\n")
        dirs.append(d)
    if not dirs:
        raise CompareError(f"W&B group {group!r} in project {path!r} has no runs")
    return dirs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ttrl-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path,
                    help="run dirs (each with config.yaml and metrics.jsonl) or sweep dirs (holding run dirs)")
    ap.add_argument("--out", type=Path, default=Path("outputs/compare"), help="where to write the table and plots")
    ap.add_argument("--wandb", metavar="GROUP", help="also compare the runs of this W&B group (needs network)")
    ap.add_argument("--project", default="ttrl")
    ap.add_argument("--entity", default=None)
    ap.add_argument("--grid", action="store_true",
                    help="the demo grid's before/after table (grid.md, grid.json, grid.png) instead")
    ap.add_argument("--replay-guard", action="store_true",
                    help="with --grid: the guard's verdict replayed on each run's votes.jsonl with today's "
                         "default limits, instead of the verdict the run logged")
    ap.add_argument("--arms", action="store_true",
                    help="one line and one pass@1 curve per arm (logger.wandb.job_type, else algorithm/reward), "
                         "with the spread across seeds (arms.md, arms.json, arms.png) instead")
    args = ap.parse_args(argv)
    try:
        runs = list(args.runs)
        if args.wandb:
            runs += _wandb_runs(args.wandb, args.project, args.entity, args.out / "wandb_runs")
        if not runs:
            ap.error("give at least one run dir (or --wandb GROUP)")
        if args.grid:
            from ttrl.grid_report import grid_report

            md = grid_report(runs, args.out, replay_guard=args.replay_guard)
            print(md.read_text())
            print(f"ttrl-compare: wrote {md}, grid.json and grid.png in {args.out}", file=sys.stderr)
            return
        if args.arms:
            from ttrl.arms_report import arms_report

            md = arms_report(runs, args.out)
            print(md.read_text())
            print(f"ttrl-compare: wrote {md}, arms.json and arms.png in {args.out}", file=sys.stderr)
            return
        md, pngs = compare(runs, args.out)
    except CompareError as err:
        print(f"ttrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())
    print(f"ttrl-compare: wrote {md}, comparison.json and {len(pngs)} plots in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
