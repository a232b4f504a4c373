"""`make run` cut down: `ttrl-train experiment=demo` with a short warm start and 3 steps.

The real demo (a 600-step warm start, 80 TTRL steps) takes minutes and is
measured by hand (docs/results.md); this test runs the same command with the same
code path at a size CI can afford and checks what a newcomer sees: the warm
start is built from scratch and cached, the test split is evaluated before
and after, the before/after table and the plot's path are printed, and the
pseudo-label metrics are logged every step. The answers reach the metrics
only: training runs on the majority-vote reward, which never sees them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

TTRL_TRAIN = str(Path(sys.executable).parent / "ttrl-train")
# A weaker warm start (other hash, so its own cache entry) and a small run.
CUT_DOWN = [
    "experiment=demo", "model.warmstart.steps=30", "model.warmstart.target_maj=null",
    "data.synthetic.num_problems=24", "data.prompts_per_step=8",
    "rollout.n_votes=8", "rollout.n_train=8", "trainer.total_steps=3", "trainer.num_workers=1",
    "trainer.micro_batch_size=32", "eval.n_samples=8", "eval.ks=[1,8]", "eval.every_n_steps=0",
]


def test_cut_down_demo_prints_the_table_and_writes_the_plot(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "CI": "true", "TTRL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([TTRL_TRAIN, *CUT_DOWN, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=1100, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr

    # The warm start was trained here (with a progress bar) and cached by its recipe's hash.
    assert "warm-starting the demo model" in err
    built = list((tmp_path / "cache" / "models").glob("tiny-arith-*"))
    assert len(built) == 1 and (built[0] / "ttrl_spec.json").exists()
    spec = json.loads((built[0] / "ttrl_spec.json").read_text())
    assert spec["recipe"]["steps"] == 30 and spec["recipe"]["format"] == "scratchpad"

    # The before/after table: every row has two numbers in [0, 1].
    for row in ("pass@1 (test prompts)", "maj@8 (test prompts)", "pseudo-label accuracy", "majority ratio"):
        line = next((ln for ln in err.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"no '{row}' row in the table:\n{err[-3000:]}"
        before, after = (float(x) for x in re.findall(r"\d+\.\d+", line)[-2:])
        assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert any(ln.startswith("training time") for ln in err.splitlines())
    # The label-free guard is on in the demo, and its verdict closes the table.
    assert "collapse guard watching vote flips, vote drift" in err
    assert "guard anchored on the starting policy's votes for 24 prompts" in err
    assert any(ln.startswith("collapse guard") and ("quiet" in ln or "fired at step" in ln)
               for ln in err.splitlines())

    # The plot exists where the last line says.
    m = re.search(r"plot (\S+training\.png)", err)
    assert m, err[-2000:]
    png = Path(m.group(1))
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) > 0 and "label/accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0.0 <= r["label/accuracy"] <= 1.0 and 0.0 <= r["label/majority_ratio"] <= 1.0
    evals = [r for r in rows if "eval/pass@1" in r]
    assert len(evals) == 2, "the demo evaluates the test split before and after training"
    # The guard's anchor votes are step 0 of votes.jsonl (one per prompt), so its signals can be replayed.
    votes = [json.loads(line) for line in (run_dir / "votes.jsonl").read_text().splitlines()]
    anchor = [v for v in votes if v["step"] == 0]
    assert len(anchor) == 24 and len({v["id"] for v in anchor}) == 24
    assert all(0.0 <= v["ratio"] <= 1.0 for v in anchor)
