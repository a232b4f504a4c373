"""Faults, injected for real: a killed run resumes, a killed engine comes back, NaNs are skipped.

Every test runs the real stack (Ray, vLLM CPU, DeepSpeed on gloo) with the
tiny random model and a fake reward that varies across samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TTRL_TRAIN = str(Path(sys.executable).parent / "ttrl-train")
FAKE = ["reward=custom", "reward.fn=tests.integration.rewards_fake:digit_share", "logger.progress=false",
        "trainer.lr=1e-3", "trainer.lr_schedule=constant"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(run_dir: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([TTRL_TRAIN, "experiment=debug", *FAKE, f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, timeout=800, cwd=Path(__file__).parents[2], **kw)


def test_sigkill_then_resume_continues_without_gaps_or_duplicates(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.total_steps=6", "trainer.save_every=2", "trainer.keep_last=3"]
    proc = subprocess.Popen([TTRL_TRAIN, "experiment=debug", *FAKE, f"hydra.run.dir={run_dir}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2], start_new_session=True)
    second = run_dir / "checkpoints" / "step_4" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not second.exists():
        assert proc.poll() is None, f"run ended before its second checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no second checkpoint within 10 minutes"
        time.sleep(0.2)
    # Kill the driver and everything it started (Ray, engines, trainers), hard.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = _train(run_dir, *args, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], "steps duplicated or missing after the resume"
    first_after = rows[4]
    assert first_after["resume/from_step"] == 4
    # The resumed policy is the checkpoint's policy, to the last bit of the fingerprint.
    assert first_after["resume/weights_fingerprint"] == pytest.approx(
        first_after["resume/checkpoint_fingerprint"], rel=1e-12)
    state = json.loads((run_dir / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_nan_loss_is_skipped_then_a_streak_stops_the_run_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    res = _train(run_dir, "trainer.total_steps=6", "trainer.save_every=1", "trainer.keep_last=5",
                 "faults.nan_loss_at_steps=[2,4,5]", "trainer.max_skipped_steps=2")
    assert res.returncode == 3, res.stderr[-3000:]
    last = [line for line in res.stderr.splitlines() if line.startswith("ttrl-train: stopped:")]
    assert last and "non-finite" in last[0] and "checkpoint" in last[0]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["train/skipped"] == 1 and "event/skipped_update" in rows[1]
    assert rows[2]["train/skipped"] == 0
    ckpts = run_dir / "checkpoints"

    def fp(step):
        return json.loads((ckpts / f"step_{step}" / "trainer_state.json").read_text())["weights_fingerprint"]

    # A skipped update leaves the weights exactly as they were; a real one moves them.
    assert fp(2) == fp(1)
    assert fp(3) != fp(2)
    assert fp(4) == fp(3)
    assert not (ckpts / "step_5").exists(), "no checkpoint is written after the stop"


def test_collapse_guard_fires_rolls_back_to_the_start_then_stops_on_it(tmp_path):
    """A label-free run whose guard fires: it logs the step and reason, reloads the
    starting weights with a smaller lr, and, out of rollbacks, stops on them.

    The threshold is one every step of the random tiny model crosses (its token
    entropy is far below 100 nats), so the test is about what the guard does in a
    real run, not about when a model collapses (the detectors' own tests cover that).
    """
    run_dir = tmp_path / "run"
    res = _train(run_dir, "reward=majority_vote", "trainer.total_steps=6", "safety.action=rollback",
                 "safety.window=2", "safety.min_entropy=100", "safety.max_rollbacks=1", "safety.lr_factor=0.5",
                 "trainer.lr_schedule=constant")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "collapse warning at step 2" in res.stderr and "train/entropy" in res.stderr
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    fired = rows[1]
    assert fired["safety/collapse_step"] == 2 and "train/entropy" in fired["safety/reason"]
    assert fired["event/rollback_to"].endswith("step_0")  # label-free: back to the starting weights
    assert fired["event/lr_after_rollback"] == pytest.approx(1e-3 * 0.5)
    assert rows[2]["train/lr"] == pytest.approx(5e-4)  # the next update ran at the cut lr
    assert all("safety/collapse_step" not in r for r in rows[2:])  # the first firing only
    # The window restarts after a rollback: the next firing needs two fresh steps.
    assert "event/collapse" not in rows[2] and rows[3]["event/action"] == "restored best, stopping"
    # The label-free vote signals are computed every step, and each step's votes are kept.
    assert all("label/distinct_answers" in r for r in rows)
    votes = [json.loads(line) for line in (run_dir / "votes.jsonl").read_text().splitlines()]
    assert sorted({v["step"] for v in votes}) == [1, 2, 3, 4] and len(votes) == 4 * 4


@pytest.mark.parametrize("path", ["ray", "ipc"])
def test_killed_rollout_engine_is_restarted_and_resynced(path):
    import random

    from tests.conftest import compose_config
    from ttrl.distributed.runtime import Runtime
    from ttrl.parts import build_parts
    from ttrl.step import StepContext, StepOptions, step

    cfg = compose_config("experiment=debug", *FAKE, f"rollout.weight_sync={path}")
    setup = build_parts(cfg)
    rt = Runtime(cfg, setup.model_path, total_opt_steps=4)
    try:
        assert rt.weight_sync == path
        ctx = StepContext(rt, setup.reward, setup.tokenizer, StepOptions.from_config(cfg), random.Random(0))
        k = cfg.data.prompts_per_step
        step(ctx, setup.prompts[:k])
        old_pid = ray.get(rt.engines[0].info.remote())["pid"]
        ray.kill(rt.engines[0], no_restart=False)  # Ray restarts it with the original weights
        row = step(ctx, setup.prompts[k:2 * k])
        assert rt.engine_restarts == 1
        info = ray.get(rt.engines[0].info.remote())
        assert info["pid"] != old_pid
        # The restarted engine sampled with the trainer's current weights: it was re-synced.
        assert row["rollout/logprob_diff"] < 1e-3
        assert info["weights_version"] == rt.weights_version
        # Lost while the weights are being sent: the sync restarts and re-syncs it (EngineSyncError
        # from the sending rank) or Ray queues the load for the restarted engine; either way the
        # run goes on with every engine on the current weights, not a dead trainer error.
        ray.kill(rt.engines[0], no_restart=False)
        rt.sync_weights()
        assert ray.get(rt.engines[0].info.remote())["weights_version"] == rt.weights_version
        row = step(ctx, setup.prompts[:k])
        assert row["rollout/logprob_diff"] < 1e-3
    finally:
        rt.shutdown()


def test_missing_resources_fail_fast_naming_them():
    from tests.conftest import compose_config
    from ttrl.distributed.placement import Placement
    from ttrl.distributed.ray_setup import ClusterError, Needs, start_ray, stop_ray

    cfg = compose_config("experiment=debug", *FAKE)
    assert cfg.trainer.num_workers == 2
    started = start_ray(None, "cpu", Needs(cpus=1, gpus=0), num_cpus=2)
    try:
        with pytest.raises(ClusterError, match="asked for 8 GPUs, cluster has 0"):
            from ttrl.distributed.ray_setup import check_resources

            check_resources(Needs(cpus=1, gpus=8))
        # A placement no node can hold times out with the shortfall named, instead of hanging.
        with pytest.raises(ClusterError, match="asked for 5 CPUs, cluster has 2 free"):
            Placement(gpu=False, colocate=False, world_size=2, n_groups=2, engines=1, tp=1, timeout_s=3)
    finally:
        stop_ray(started)
