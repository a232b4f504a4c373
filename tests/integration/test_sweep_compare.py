"""A real sweep, as a researcher runs it, then `ttrl-compare` on what it wrote.

`ttrl-train -m experiment=debug algorithm=grpo,ppo trainer.total_steps=1`
runs two jobs one after the other in one process (Hydra's basic launcher),
each a real training step on Ray + vLLM (CPU) + DeepSpeed, each in its own
run dir, with W&B in offline mode. Then:
- each job started its own local Ray cluster and shut it down (two Ray
  sessions under the test's own RAY_TMPDIR, no Ray process left after);
- both W&B runs share the sweep's group, are named by their overrides and
  carry their arm as job type;
  their config and metrics are read back from the offline `.wandb` files;
- `ttrl-compare` on the sweep dir writes a table naming grpo and ppo, and plots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray_processes(marker: str) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmd:
            out.append(cmd[:120])
    return out


def test_grpo_ppo_sweep_then_compare(tmp_path):
    sweep = tmp_path / "sweep"
    # Ray's sessions of this test only, in a short path (Ray's socket paths have a length limit).
    ray_tmp = tempfile.mkdtemp(prefix="ttrlsw-", dir="/tmp")
    env = {**os.environ, "CI": "true", "RAY_TMPDIR": ray_tmp, "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [str(BIN / "ttrl-train"), "-m", "experiment=debug", "algorithm=grpo,ppo", "trainer.total_steps=1",
             "logger=wandb", "logger.wandb.mode=offline", f"hydra.sweep.dir={sweep}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
        assert proc.returncode == 0, proc.stderr[-5000:]
        # One local Ray cluster per job, each shut down before the next started, none left.
        sessions = sorted(p.name for p in (Path(ray_tmp) / "ray").glob("session_2*"))
        assert len(sessions) == 2, sessions
        assert not _ray_processes(ray_tmp), "Ray processes outlived the sweep"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # ── two run dirs, one per job ─────────────────────────────────────────
    runs = sorted((d for d in sweep.iterdir() if (d / "config.yaml").exists()), key=lambda d: d.name)
    assert [d.name.split("_")[0] for d in runs] == ["0", "1"]
    algos = [yaml.safe_load((d / "config.yaml").read_text())["algorithm"]["name"] for d in runs]
    assert algos == ["grpo", "ppo"]
    assert (sweep / "multirun.yaml").exists()
    metrics = {}
    for d, algo in zip(runs, algos):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1]
        metrics[algo] = rows[0]
        samples = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
        assert samples and all(s["step"] == 1 and "pseudo_label" in s and "completion" in s for s in samples)
        assert (d / "checkpoints" / "step_1" / "trainer_state.json").exists()
    assert "critic/vf_loss" in metrics["ppo"] and "critic/vf_loss" not in metrics["grpo"]

    # ── W&B (offline): one group for the sweep, runs named by their overrides ──
    from ttrl.metrics.logger import read_wandb_run

    wb = {algo: read_wandb_run(d) for d, algo in zip(runs, algos)}
    assert wb["grpo"]["run"]["group"] == wb["ppo"]["run"]["group"] == f"debug/{sweep.name}"
    for algo in algos:
        run = wb[algo]
        assert run["run"]["name"].startswith("debug/") and f"algorithm={algo}" in run["run"]["name"]
        assert algo in run["run"]["tags"]
        # One W&B job type per arm (the UI groups and filters by it).
        assert run["run"]["job_type"] == f"{algo}/{run['config']['reward']['name']}"
        assert run["config"]["algorithm"]["name"] == algo and run["config"]["trainer"]["total_steps"] == 1
        logged = next(h for h in run["history"] if "reward/mean" in h)
        assert logged["step"] == 1
        assert logged["reward/mean"] == pytest.approx(metrics[algo]["reward/mean"])
        assert logged["label/accuracy"] == pytest.approx(metrics[algo]["label/accuracy"])
        assert any("samples/_type" in h for h in run["history"])  # the sample table

    # ── ttrl-compare on the sweep dir ─────────────────────────────────────
    out = tmp_path / "compare"
    cmp = subprocess.run([str(BIN / "ttrl-compare"), str(sweep), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cmp.returncode == 0, cmp.stderr
    table = (out / "comparison.md").read_text()
    assert "# ttrl-compare: 2 runs" in table
    lines = [x for x in table.splitlines() if x.startswith("| algorithm=")]
    assert [x.split("|")[1].strip() for x in lines] == ["algorithm=grpo", "algorithm=ppo"]
    assert all(f"`{d}`" in line for d, line in zip(runs, lines))
    assert "| algorithm=grpo |" in cmp.stdout
    pngs = sorted(p.name for p in out.glob("compare_*.png"))
    assert {"compare_reward_mean.png", "compare_label_accuracy.png", "compare_train_passat1.png"} <= set(pngs)
    assert len(json.loads((out / "comparison.json").read_text())) == 2
