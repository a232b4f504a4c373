"""experiments/sweeps/ppo_grpo_ser.sh: which runs it starts, with what, and the per-arm report.

The sweep's runs take an hour each on CPU, so here `ttrl-train` is a fake
(FAKE_TTRL_TRAIN below: it records its arguments and writes a run dir as a
finished run would: config.yaml, metrics.jsonl with eval rows, training.png,
and for an RM-only SER run the RM's ttrl_rm.json). `ttrl-compare` is the real
one. What is checked is the script's wiring, which a user relies on: one
shared reward model for the ppo_rm and grpo_rm arms, every run in one W&B
group with its arm as job type, a finished run not run again, a failed run
reported without stopping the sweep, and the per-arm table and plot.
The real runs' W&B grouping is read back from offline files in
tests/integration/test_sweep_compare.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "sweeps" / "ppo_grpo_ser.sh"

FAKE_TTRL_TRAIN = r'''#!PYTHON
"""Fake ttrl-train for the sweep test: logs argv, writes a finished run dir."""
import json, os, sys
from pathlib import Path
import yaml
args = dict(a.split("=", 1) for a in sys.argv[1:])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if args.get("seed") == os.environ.get("FAKE_FAIL_SEED") and args.get("logger.wandb.job_type") == os.environ.get("FAKE_FAIL_ARM"):
    print("fake failure", file=sys.stderr)
    sys.exit(3)
exp = args["experiment"]
algo = args.get("algorithm", "ppo" if exp == "ser_demo" else "dr_grpo")
reward = args.get("reward", "reward_model" if exp == "ser_demo" else "majority_vote")
ser = exp == "ser_demo" and args.get("ser.enabled") != "false"
d = Path(args["hydra.run.dir"])
d.mkdir(parents=True, exist_ok=True)
cfg = {"experiment": exp, "seed": int(args["seed"]), "algorithm": {"name": algo},
       "reward": {"name": reward, "path": args.get("reward.path", "ser" if ser else None)},
       "ser": {"enabled": ser}, "trainer": {"total_steps": 20},
       "logger": {"wandb": {"group": args["logger.wandb.group"], "job_type": args["logger.wandb.job_type"]}}}
(d / "config.yaml").write_text(yaml.safe_dump(cfg))
if ser:
    rm = d / "ser" / "final_rm"
    rm.mkdir(parents=True)
    (rm / "ttrl_rm.json").write_text(json.dumps({"held_out_accuracy": 0.9, "test_accuracy": 0.88}))
    (rm / "config.json").write_text("{}")
    (d / "ser" / "summary.json").write_text("{}")
if args.get("ser.then_policy") == "false":
    (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "ser/round": 0}) + "\n")
    sys.exit(0)
arm_gain = {"ser_chain": 0.10, "ppo_rm": 0.12, "grpo_rm": 0.14, "majority": 0.25, "oracle": 0.26}
g = arm_gain[args["logger.wandb.job_type"]] + 0.01 * int(args["seed"])
rows = [{"step": s, "eval/pass@1": 0.6 + g * s / 20, "eval/maj@16": 0.98} for s in (0, 10, 20)]
(d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(d / "training.png").write_bytes(b"png")
print("pass@1 done")
'''


def _bin(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    b.mkdir()
    fake = b / "ttrl-train"
    fake.write_text(FAKE_TTRL_TRAIN.replace("#!PYTHON", f"#!{sys.executable}"))
    fake.chmod(0o755)
    real = Path(sys.executable).parent / "ttrl-compare"
    if not real.exists():
        pytest.skip(f"{real} not installed (pip install -e .)")
    (b / "ttrl-compare").symlink_to(real)
    return b


def _sweep(tmp_path: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "BIN": f"{_bin(tmp_path) if not (tmp_path / 'bin').exists() else tmp_path / 'bin'}/",
         "OUT": str(out), "FAKE_LOG": str(tmp_path / "calls.jsonl"), **env}
    return subprocess.run(["bash", str(SCRIPT), *extra], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def _calls(tmp_path: Path) -> list[dict[str, str]]:
    log = tmp_path / "calls.jsonl"
    if not log.exists():
        return []
    return [dict(a.split("=", 1) for a in json.loads(x)) for x in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_sweep_runs_every_arm_against_one_shared_reward_model(tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep(tmp_path, out, "trainer.total_steps=20")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    calls = _calls(tmp_path)
    # The RM is trained once, before any policy run, and only the RM: SER alone.
    assert calls[0]["experiment"] == "ser_demo" and calls[0]["ser.then_policy"] == "false"
    assert calls[0]["seed"] == "100"
    rm = str(out / "rm_ser_s100" / "ser" / "final_rm")
    policy = calls[1:]
    assert len(policy) == 10  # 5 arms x 2 seeds
    by_arm: dict[str, list[dict]] = {}
    for c in policy:
        by_arm.setdefault(c["logger.wandb.job_type"], []).append(c)
    assert set(by_arm) == {"ser_chain", "ppo_rm", "grpo_rm", "majority", "oracle"}
    assert all(sorted(c["seed"] for c in cs) == ["0", "1"] for cs in by_arm.values())
    # ppo_rm and grpo_rm share the one RM and differ only in the algorithm.
    for c in by_arm["ppo_rm"] + by_arm["grpo_rm"]:
        assert c["reward.path"] == rm and c["ser.enabled"] == "false"
    assert all("algorithm" not in c for c in by_arm["ppo_rm"])
    assert all(c["algorithm"] == "grpo" for c in by_arm["grpo_rm"])
    assert all("reward.path" not in c and c["experiment"] == "ser_demo" for c in by_arm["ser_chain"])
    assert all(c["reward"] == "ground_truth" for c in by_arm["oracle"])
    # One W&B group for the sweep; every run on the same warm start; the user's overrides reach every run.
    assert len({c["logger.wandb.group"] for c in calls}) == 1
    assert {(c["model.tiny.seed"], c["model.warmstart.seed"]) for c in calls} == {("0", "0")}
    assert all(c["trainer.total_steps"] == "20" for c in calls)

    # The per-arm report (the real ttrl-compare --arms).
    md = (out / "report" / "arms.md").read_text()
    assert "10 runs, 5 arms" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| arm ")}
    assert "| 0,1 |" in rows["oracle"] and "+0.265" in rows["oracle"]  # median of +0.26, +0.27
    assert "+0.140" in rows["grpo_rm"]  # worst gain, seed 0
    assert "0.880 ± 0.000" in rows["ppo_rm"]  # the RM's test accuracy, from its ttrl_rm.json
    assert "0.880" in rows["ser_chain"] and "– |" in rows["majority"]
    assert (out / "report" / "arms.png").stat().st_size > 10_000
    summary = json.loads((out / "report" / "arms.json").read_text())["arms"]
    assert summary["ppo_rm"]["worst_run"].endswith("ppo_rm_s0")

    # A second call runs nothing again: every run is finished.
    n = len(calls)
    again = _sweep(tmp_path, out)
    assert again.returncode == 0, again.stderr
    assert len(_calls(tmp_path)) == n
    assert again.stdout.count("done already") == 11


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep(tmp_path, out, ARMS="majority oracle", FAKE_FAIL_ARM="majority", FAKE_FAIL_SEED="0")
    assert proc.returncode == 0, proc.stderr
    assert f"!! {out}/majority_s0 exited" in proc.stdout
    calls = _calls(tmp_path)
    # No RM-only run when no arm needs it; the other three runs ran.
    assert [c["logger.wandb.job_type"] for c in calls] == ["majority", "oracle", "majority", "oracle"]
    md = (out / "report" / "arms.md").read_text()
    assert "3 runs, 2 arms" in md


def test_an_unknown_arm_is_refused_by_name(tmp_path):
    proc = _sweep(tmp_path, tmp_path / "sweep", ARMS="majority ppo")
    assert proc.returncode == 2
    assert "unknown arm 'ppo'" in proc.stderr
    assert not _calls(tmp_path)  # refused before anything ran
