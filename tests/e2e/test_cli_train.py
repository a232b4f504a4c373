"""`ttrl-train experiment=debug` from the command line, as a user runs it.

Each run is a real 2-step training run (Ray + vLLM CPU + DeepSpeed ZeRO-3 on
2 ranks) and must leave a complete run dir behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TTRL_TRAIN = str(Path(sys.executable).parent / "ttrl-train")
# The metric names every training step must log (docs/development/contracts.md lists them).
STEP_METRICS = [
    "label/accuracy", "label/majority_ratio", "reward/accuracy", "reward/mean", "train/pass@1",
    "train/kl", "train/entropy", "train/clip_frac", "timing/generate", "timing/sync", "timing/train",
    "timing/step", "rollout/tokens_per_s", "rollout/logprob_diff",
]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_debug_run_writes_a_complete_run_dir(tmp_path, algorithm):
    run_dir = tmp_path / f"run-{algorithm}"
    proc = subprocess.run(
        [TTRL_TRAIN, "experiment=debug", f"algorithm={algorithm}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=800, env={**os.environ, "CI": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["algorithm"]["name"] == algorithm
    assert cfg["trainer"]["total_steps"] == 2

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = [m for m in STEP_METRICS if row.get(m) is None]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["rollout/logprob_diff"] < 1e-3, "engine and trainer disagree: the weight sync is broken"
        assert row["timing/step"] >= row["timing/generate"] + row["timing/train"]
    if algorithm == "ppo":
        assert all("critic/vf_loss" in r for r in rows)
    # The first step names the weights the run started from (reports refuse to mix two builds of one warm start).
    from omegaconf import OmegaConf

    from ttrl.models.resolve import resolve_model_path, weights_fingerprint

    built = resolve_model_path(OmegaConf.create(cfg["model"]), OmegaConf.create(cfg["data"]))  # cached by the run
    assert rows[0]["model/fingerprint"] == weights_fingerprint(built) is not None
    assert "model/fingerprint" not in rows[1]

    ckpt = run_dir / "checkpoints" / "step_2"
    assert (ckpt / "trainer_state.json").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    # The exported policy is a Hugging Face model dir that transformers loads.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    AutoTokenizer.from_pretrained(ckpt / "policy")
