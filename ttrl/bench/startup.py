"""`make bench` section startup: seconds from the command to the first step, ttrl's side.

Runs `ttrl-train` (as `python -m ttrl.train`) in a process of its own on
the bench's model and sizes, for one step, with nothing before it that
TRL's side does not do either (no starting eval, no anchor votes), and
reads what the run logged with its first step: `startup/first_step_s`
(from the process's creation) and the phases (`startup/*`: Ray, engines,
ranks). TRL's side is timed the same way in ttrl/bench/trl_step.py; the
bench divides the two (`startup_vs_trl`). Starts its own cluster and
leaves none behind; never runs beside another cluster of the bench.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def bench_startup(overrides: list[str], timeout_s: float = 900) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ttrl-bench-startup-") as tmp:
        cmd = [sys.executable, "-m", "ttrl.train", *overrides, "trainer.total_steps=1", "eval.at_start=false",
               "eval.at_end=false", "eval.every_n_steps=0", "safety.anchor_prompts=0", "trainer.save_every=0",
               "logger.progress=false", f"hydra.run.dir={tmp}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
        metrics = Path(tmp) / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return {"startup.error": f"exit {proc.returncode}: {tail}"}
        first = next(json.loads(line) for line in metrics.read_text().splitlines()
                     if json.loads(line).get("step") == 1)
    out = {f"startup.{k.split('/', 1)[1]}": v for k, v in first.items() if k.startswith("startup/")}
    out["startup.ttrl_s"] = first["startup/first_step_s"]
    out["startup.command_wall_s"] = wall  # the whole command: start-up, one step, shutdown
    return out


__all__ = ["bench_startup"]
