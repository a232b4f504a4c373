"""`ttrl-compare RUN_DIR... [--out DIR]`: runs side by side, from their run dirs alone.

Reads each run's `config.yaml` and `metrics.jsonl` (no W&B needed), labels
each run by what differs between the configs (e.g. `algorithm=ppo` vs
`algorithm=grpo`), and writes a markdown table (final and best pass@1,
maj@N, label accuracy, wall time, tokens/s) and one PNG per main metric with
one line per run. It never modifies a run dir.
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
]
# Keys that differ between any two runs without saying anything about them.
_IGNORED = ("hydra", "logger", "trainer.resume")


class CompareError(ValueError):
    pass


def load_run(run_dir: Path) -> dict[str, Any]:
    cfg_file, met_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not cfg_file.exists():
        raise CompareError(f"{run_dir}: no config.yaml (is this a ttrl run dir?)")
    if not met_file.exists():
        raise CompareError(f"{run_dir}: no metrics.jsonl")
    rows = []
    for lineno, line in enumerate(met_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; anything else is damage.
            if lineno != len(met_file.read_text().splitlines()):
                raise CompareError(f"{met_file}:{lineno}: not valid JSON") from None
    return {"dir": run_dir, "config": yaml.safe_load(cfg_file.read_text()) or {}, "rows": rows}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def run_labels(configs: list[dict]) -> list[str]:
    """Label each run by the config values that differ between the runs."""
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if not k.startswith(_IGNORED) and len({json.dumps(f.get(k)) for f in flat}) > 1]
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


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step") is not None]


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in run["rows"] if "step" in r]
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
        "wall_s": sum(r.get("timing/step") or 0.0 for r in train_rows),
        "tokens_per_s": sum(tps) / len(tps) if tps else math.nan,
    }


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown_table(labels: list[str], summaries: list[dict], dirs: list[Path]) -> str:
    maj = next((s["maj_key"] for s in summaries if s["maj_key"]), "maj@N")
    head = ("| run | steps | pass@1 final | pass@1 best | eval pass@1 final | eval pass@1 best | "
            f"{maj} final | label acc final | label acc best | wall (s) | tokens/s | dir |")
    lines = [head, "|" + "---|" * 12]
    for label, s, d in zip(labels, summaries, dirs):
        lines.append(
            f"| {label} | {s['steps']} | {_fmt(s['train_pass1'][0])} | {_fmt(s['train_pass1'][1])} | "
            f"{_fmt(s['eval_pass1'][0])} | {_fmt(s['eval_pass1'][1])} | {_fmt(s['maj'][0])} | "
            f"{_fmt(s['label_acc'][0])} | {_fmt(s['label_acc'][1])} | {s['wall_s']:.0f} | "
            f"{s['tokens_per_s']:.0f} | `{d}` |")
    return "\n".join(lines) + "\n"


def plot_metrics(runs: list[dict], labels: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def compare(run_dirs: list[Path], out: Path) -> tuple[Path, list[Path]]:
    runs = [load_run(d) for d in run_dirs]
    labels = run_labels([r["config"] for r in runs])
    summaries = [summarize(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(labels, summaries, run_dirs)
    md = out / "comparison.md"
    md.write_text(f"# ttrl-compare: {len(runs)} runs\n\n{table}")
    pngs = plot_metrics(runs, labels, out)
    return md, pngs


def _wandb_runs(group: str, project: str, entity: str | None, dest: Path) -> list[Path]:
    """Pull a W&B group's runs into local run dirs (config.yaml + metrics.jsonl)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    dirs = []
    for run in api.runs(path, filters={"group": group}):
        d = dest / run.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(dict(run.config)))
        with (d / "metrics.jsonl").open("w") as fh:
            for row in run.scan_history():
                row = {k: v for k, v in row.items() if not k.startswith("_")} | {"step": row.get("_step")}
                fh.write(json.dumps(row) + "\n")
        dirs.append(d)
    return dirs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ttrl-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run dirs (each with config.yaml and metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=Path("outputs/compare"), help="where to write the table and plots")
    ap.add_argument("--wandb", metavar="GROUP", help="compare the runs of this W&B group instead")
    ap.add_argument("--project", default="ttrl")
    ap.add_argument("--entity", default=None)
    args = ap.parse_args(argv)
    try:
        runs = list(args.runs)
        if args.wandb:
            runs += _wandb_runs(args.wandb, args.project, args.entity, args.out / "wandb_runs")
        if not runs:
            ap.error("give at least one run dir (or --wandb GROUP)")
        md, pngs = compare(runs, args.out)
    except CompareError as err:
        print(f"ttrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text())
    print(f"ttrl-compare: wrote {md} and {len(pngs)} plots in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
