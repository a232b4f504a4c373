"""Reading run dirs for the reports: configs, metric rows, labels, small statistics.

A run dir holds `config.yaml` (the resolved config) and `metrics.jsonl` (one
JSON object per line, each with `step`); a sweep dir (`multirun/...`) holds
run dirs and stands for all of them. An archived run (experiments/results/)
may hold its JSONL files gzipped (`metrics.jsonl.gz`, `votes.jsonl.gz`):
`jsonl_file` finds either and `read_jsonl_rows` reads it (a torn last line skipped;
both from ttrl.metrics.jsonl, which the replay shares). Everything here is shared by the
side-by-side table, the grid and the arms reports. It only reads run dirs
(`pull_wandb_group` writes new ones from W&B, never into an existing run),
and imports no other report module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from ttrl.metrics.jsonl import jsonl_file
from ttrl.metrics.jsonl import read_jsonl_rows as _read_rows

# Keys that differ between any two runs without saying anything about them.
# `run` is what the W&B logger adds (run dir, overrides).
IGNORED_KEYS = ("hydra", "logger", "trainer.resume", "run")


class CompareError(ValueError):
    """A run dir (or W&B group) that cannot be read; `ttrl-compare` prints it as one line and exits 2."""


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """`ttrl.metrics.jsonl.read_jsonl_rows`, a damaged line raised as a CompareError (one line, exit 2)."""
    try:
        return _read_rows(path)
    except ValueError as err:
        raise CompareError(str(err)) from None


def load_run(run_dir: Path) -> dict[str, Any]:
    """{"dir", "config", "rows"} of one run dir; a torn last line of metrics.jsonl is skipped."""
    cfg_file, met_file = run_dir / "config.yaml", jsonl_file(run_dir, "metrics.jsonl")
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: no such directory")
    if not cfg_file.exists():
        raise CompareError(f"{run_dir}: no config.yaml, so not a ttrl run dir (a run dir holds config.yaml and"
                           " metrics.jsonl; a sweep dir holds run dirs)")
    if met_file is None:
        raise CompareError(f"{run_dir}: no metrics.jsonl (the run stopped before its first step?)")
    rows = read_jsonl_rows(met_file)
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


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"dotted.key": value}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def run_labels(configs: list[dict], ignore: tuple[str, ...] = ()) -> list[str]:
    """Label each run by the config values that differ between the runs."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    skip = IGNORED_KEYS + tuple(ignore)
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


def unique_labels(labels: list[str], dirs: list[Path]) -> list[str]:
    """Two runs with one label (identical configs) get their dir names added."""
    return [f"{lab} [{d.name}]" if labels.count(lab) > 1 else lab for lab, d in zip(labels, dirs)]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged `key` as a number."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step") is not None]


def maj_key_of(rows: list[dict]) -> str | None:
    """The largest eval/maj@K the rows logged (maj@1 is pass@1 by another name), or None."""
    keys = {k for r in rows for k in r if k.startswith("eval/maj@") and "stderr" not in k and k != "eval/maj@1"}
    return max(keys, key=lambda k: int(k.split("@")[1])) if keys else None


def mean_std(xs: list[float]) -> str:
    """"m ± sd" (sample sd) over the numbers that are not NaN; "–" when there are none."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def without_nan(row: dict[str, Any]) -> dict[str, Any]:
    """A row for JSON: NaN (no value) becomes null, tuples become lists."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, tuple):
            return [clean(v) for v in x]
        return x

    return {k: clean(v) for k, v in row.items()}


def pull_wandb_group(group: str, project: str, entity: str | None, dest: Path) -> list[Path]:
    """Pull a W&B group's runs into new local run dirs (config.yaml + metrics.jsonl) under `dest`."""
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
