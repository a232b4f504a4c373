"""experiments/sweeps/hard_regime.sh: which runs and probes it starts, with what, and its reports.

The real sweep takes hours on CPU, so `ttrl-train` is a fake here (it records
its arguments and writes a run dir as a finished run, or a probe its guard
stopped, would: config.yaml, metrics.jsonl with the starting weights'
fingerprint, votes.jsonl, training.png);
`ttrl-compare` is the real one. Checked is the wiring a user relies on: every
arm on every warm start and seed with nothing but the reward changed (and
evol_rl's update options), one collapse probe per warm start whose stop
(exit status 3) is its answer and not a failure, a finished run or probe not
run again, a failed run reported without stopping the sweep, and the
per-arm and collapse-step reports with the probes ranked against TTRL's gains,
and an archive that only takes runs from the weights its runs started from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "sweeps" / "hard_regime.sh"

FAKE_TTRL_TRAIN = r'''#!PYTHON
"""Fake ttrl-train for the sweep test: logs argv, writes a finished run dir (or a stopped probe's)."""
import json, os, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if args.get("reward") == os.environ.get("FAKE_FAIL_ARM") and args.get("seed") == "0":
    sys.exit(1)
d = Path(args["hydra.run.dir"])
d.mkdir(parents=True, exist_ok=True)
ws = int(args["model.tiny.seed"])
probe = args.get("debug") == "collapse_probe"
cfg = {"experiment": args["experiment"], "seed": int(args["seed"]), "algorithm": {"name": "dr_grpo"},
       "reward": {"name": args["reward"]}, "trainer": {"total_steps": 6 if probe else 20},
       "model": {"path": "tiny-arith", "tiny": {"seed": ws}, "warmstart": {"seed": int(args["model.warmstart.seed"])}},
       "data": {"synthetic": {"terms": 3, "digits": 2}}, "safety": {"window": 3},
       "logger": {"wandb": {"job_type": args["logger.wandb.job_type"]}}}
(d / "config.yaml").write_text(json.dumps(cfg))
# Anchor votes "7" on 4 prompts; probes: from step `switch` on 3 of 4 vote "8" (the guard fires at step 3 when
# they switch at 2, at step 4 when at 4), warm start 4 never switches.
switch = {0: 2, 1: 4}.get(ws) if probe else None
fires = {2: 3, 4: 4}.get(switch)
steps = fires or cfg["trainer"]["total_steps"]
votes = [{"step": s, "id": f"p{i}", "label": "8" if switch and s and s >= switch and i < 3 else "7", "ratio": 0.8,
          "classes": 2} for s in range(steps + 1) for i in range(4)]
(d / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
gain = {0: -0.10, 1: 0.0, 4: 0.05}[ws] + 0.01 * int(args["seed"])
rows = [{"step": s, "timing/step": 3.0} for s in range(1, steps + 1)]
# The starting weights' fingerprint, with the first step, as a real run logs it (FAKE_FINGERPRINT: another build).
rows[0]["model/fingerprint"] = os.environ.get("FAKE_FINGERPRINT", "0123456789abcdef")
if not probe:
    rows = [{"step": 0, "eval/pass@1": 0.5, "eval/maj@16": 0.7}, *rows[:-1],
            rows[-1] | {"eval/pass@1": 0.5 + gain, "eval/maj@16": 0.7 + gain}]
if fires:
    rows[-1]["safety/collapse_step"] = fires
(d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
if fires:
    print(f"ttrl-train: stopped: collapse detected at step {fires}", file=sys.stderr)
    sys.exit(3)
(d / "training.png").write_bytes(b"png")
'''

ARMS = "majority_vote evol_rl random"


def _sweep(tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    b = tmp_path / "bin"
    if not b.exists():
        b.mkdir()
        fake = b / "ttrl-train"
        fake.write_text(FAKE_TTRL_TRAIN.replace("#!PYTHON", f"#!{sys.executable}"))
        fake.chmod(0o755)
        real = Path(sys.executable).parent / "ttrl-compare"
        if not real.exists():
            pytest.skip(f"{real} not installed (pip install -e .)")
        (b / "ttrl-compare").symlink_to(real)
    e = {**os.environ, "BIN": f"{b}/", "OUT": str(tmp_path / "sweep"), "FAKE_LOG": str(tmp_path / "calls.jsonl"),
         "BEDS": "demo_hard", "ARMS": ARMS, **env}
    return subprocess.run(["bash", str(SCRIPT), *extra], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def _calls(tmp_path: Path) -> list[dict[str, str]]:
    log = tmp_path / "calls.jsonl"
    return [dict(a.split("=", 1) for a in json.loads(x)) for x in log.read_text().splitlines()] if log.exists() else []


def test_the_sweep_runs_every_arm_and_a_probe_per_warm_start_then_reports(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "trainer.lr=2e-5")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "!!" not in proc.stdout  # a probe stopped by its guard (exit 3) is not a failure
    calls = _calls(tmp_path)
    probes = [c for c in calls if c.get("debug") == "collapse_probe"]
    runs = [c for c in calls if "debug" not in c]
    # Three warm starts (the default), one probe each, with the intrinsic reward.
    assert sorted((c["model.tiny.seed"], c["model.warmstart.seed"]) for c in probes) == \
        [("0", "0"), ("1", "1"), ("4", "7")]
    assert {c["reward"] for c in probes} == {"token_entropy"}
    # 3 arms x 3 warm starts x 2 seeds, each with its arm as job type, on the bed, fresh, with the user's override.
    assert len(runs) == 18
    assert sorted({(c["reward"], c["model.tiny.seed"], c["seed"]) for c in runs}) == sorted(
        (a, m, s) for a in ARMS.split() for m in ("0", "1", "4") for s in ("0", "1"))
    assert all(c["experiment"] == "demo_hard" and c["logger.wandb.job_type"] == c["reward"]
               and c["trainer.resume"] == "none" and c["trainer.lr"] == "2e-5" for c in runs)
    # Only evol_rl gets the paper's update options; the other arms differ in the reward alone.
    for c in runs:
        has = {k: c.get(k) for k in ("algorithm.clip_high", "algorithm.entropy_coef")}
        assert has == ({"algorithm.clip_high": "0.28", "algorithm.entropy_coef": "0.001"}
                       if c["reward"] == "evol_rl" else {"algorithm.clip_high": None, "algorithm.entropy_coef": None})

    rep = tmp_path / "sweep" / "report" / "demo_hard"
    arms = (rep / "arms.md").read_text()
    assert "18 runs, 3 arms" in arms  # the probes are not arms
    assert [r["collapse_step"] for r in json.loads((rep / "collapse.json").read_text())["runs"]] == [None] * 18
    # The same runs judged with the drift above its sampling floor (raw drift off, excess drift on).
    assert len(json.loads((rep / "floor" / "collapse.json").read_text())["runs"]) == 18
    probe_report = json.loads((rep / "probes" / "collapse.json").read_text())
    assert [w["collapse_step"] for w in probe_report["warm_starts"]] == [3, 4, 7]  # held 6 steps -> 7
    # TTRL's median gains per warm start: -0.095, +0.005, +0.055: ranked as the collapse steps are.
    assert probe_report["spearman"] == pytest.approx(1.0)

    # A second call runs nothing again: finished runs and probes that stopped are done.
    n = len(calls)
    again = _sweep(tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(_calls(tmp_path)) == n
    assert again.stdout.count("done already") == 21


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, FAKE_FAIL_ARM="random", WARMSTARTS="0:0 1:1 4:7", SEEDS="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("!! ") == 3 and "random_ws0-0_s0 exited 1" in proc.stdout
    assert "6 runs, 2 arms" in (tmp_path / "sweep" / "report" / "demo_hard" / "arms.md").read_text()


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, DRY_RUN="1", BEDS="demo_hard demo_hard_4terms", ARMS="majority_vote",
                  WARMSTARTS="0:0 1:1 4:7", SEEDS="0 1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum("ttrl-train" in x and "debug=collapse_probe" in x for x in lines) == 6   # 2 beds x 3 warm starts
    assert sum("ttrl-train" in x and "debug=" not in x for x in lines) == 12            # x 2 seeds x 1 arm
    assert sum("ttrl-compare" in x and "--arms" in x for x in lines) == 2
    assert not _calls(tmp_path) and not (tmp_path / "sweep").exists()


def test_an_unknown_bed_or_arm_is_refused_by_name(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, ARMS="majority_vote evol")
    assert proc.returncode == 2 and "no reward 'evol'" in proc.stderr
    proc = _sweep(tmp_path, BEDS="demo_hardest")
    assert proc.returncode == 2 and "no experiment 'demo_hardest'" in proc.stderr
    assert not _calls(tmp_path)


def test_an_archive_keeps_finished_runs_across_machines_and_the_reports_read_it(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    proc = _sweep(tmp_path, ARCHIVE=str(archive), WARMSTARTS="0:0 1:1 4:7", SEEDS="0")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    n = len(_calls(tmp_path))
    assert n == 3 + 9  # 3 probes, 3 arms x 3 warm starts
    run = archive / "demo_hard" / "majority_vote_ws0-0_s0"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl.gz", "votes.jsonl.gz"]
    assert (archive / "demo_hard" / "probes" / "probe_ws0-0" / "votes.jsonl.gz").exists()
    # A new machine: the sweep dir is gone, the archive (committed) is there. Nothing runs again, and a
    # second seed adds to the same tables.
    shutil.rmtree(tmp_path / "sweep")
    again = _sweep(tmp_path, ARCHIVE=str(archive), WARMSTARTS="0:0 1:1 4:7", SEEDS="0 1")
    assert again.returncode == 0, again.stderr + again.stdout
    assert again.stdout.count("archived already") == 12 and len(_calls(tmp_path)) == n + 9
    rep = archive / "report" / "demo_hard"
    assert "18 runs, 3 arms" in (rep / "arms.md").read_text()
    assert json.loads((rep / "probes" / "collapse.json").read_text())["spearman"] == pytest.approx(1.0)
    assert not (tmp_path / "sweep" / "report").exists()


def test_another_machines_build_of_a_warm_start_stays_out_of_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    first = _sweep(tmp_path, ARCHIVE=str(archive), WARMSTARTS="0:0 1:1", SEEDS="0")
    assert first.returncode == 0, first.stderr + first.stdout
    n = len(_calls(tmp_path))  # 2 probes, 3 arms x 2 warm starts
    # Another machine continues the sweep with a second seed; its builds have other weights.
    shutil.rmtree(tmp_path / "sweep")
    again = _sweep(tmp_path, ARCHIVE=str(archive), WARMSTARTS="0:0 1:1", SEEDS="0 1",
                   FAKE_FINGERPRINT="fedcba9876543210")
    assert again.returncode == 0, again.stderr + again.stdout
    # One run per warm start finds out, says so, and is not archived; the warm start's other runs are skipped.
    assert len(_calls(tmp_path)) == n + 2
    warned = [x for x in again.stdout.splitlines() if x.startswith("!! ")]
    assert len(warned) == 2 and all("fedcba9876543210" in x and "0123456789abcdef" in x for x in warned)
    assert again.stdout.count("skipped (this machine's build") == 4
    assert not list(archive.glob("demo_hard/*_s1"))
    assert "6 runs, 3 arms" in (archive / "report" / "demo_hard" / "arms.md").read_text()
