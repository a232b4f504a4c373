"""Checkpoints (ttrl/checkpoint.py) and the step's frozen options, with a stand-in runtime (no engine)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from ttrl import checkpoint

pytestmark = pytest.mark.unit


class FakeRuntime:
    """Writes what Runtime.save would (a file per state dir) and remembers what it loaded."""

    weights_version = 7

    def __init__(self):
        self.loaded: list[str] = []

    def save(self, path, export_hf=True):
        for sub in ("policy", "policy_ds"):
            (Path(path) / sub).mkdir(parents=True)

    def load(self, path):
        self.loaded.append(path)

    def fingerprint(self):
        return 1.5


def test_save_find_prune_restore(tmp_path):
    rt, rng = FakeRuntime(), random.Random(0)
    for s in (1, 2, 3):
        checkpoint.save(rt, tmp_path, s, {"epoch": 0, "pos": s}, rng, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_2", "step_3"], "keep_last=2 keeps the newest two"
    state = json.loads((tmp_path / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state == {"step": 3, "sampler": {"epoch": 0, "pos": 3}, "weights_version": 7,
                     "weights_fingerprint": 1.5, "eval_pass1": None}

    # A write cut short leaves a tmp dir, or a step dir without its state: neither is resumed from.
    (tmp_path / "checkpoints" / ".tmp-step_4").mkdir()
    (tmp_path / "checkpoints" / "step_5").mkdir()
    assert checkpoint.find(tmp_path, "auto").name == "step_3"
    assert checkpoint.find(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="trainer.resume=.*no trainer_state.json"):
        checkpoint.find(tmp_path, str(tmp_path / "checkpoints" / "step_5"))

    # Restoring brings back the driver's random state as it was when step 3 was saved.
    expected = rng.random()
    rng.random()
    got = checkpoint.restore(rt, tmp_path / "checkpoints" / "step_3", rng)
    assert got["step"] == 3 and rt.loaded == [str(tmp_path / "checkpoints" / "step_3")]
    assert rng.random() == expected


def test_prune_never_removes_the_protected_checkpoint(tmp_path):
    rt, rng = FakeRuntime(), random.Random(0)
    first = checkpoint.save(rt, tmp_path, 0, {}, rng, keep_last=1)
    for s in (1, 2):
        checkpoint.save(rt, tmp_path, s, {}, rng, keep_last=1, protect=first)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_0", "step_2"]


def test_step_options_are_frozen_and_built_once(tmp_path):
    from omegaconf import OmegaConf

    from ttrl.config import TTRLConfig
    from ttrl.step import StepOptions

    cfg = OmegaConf.structured(TTRLConfig)
    opts = StepOptions.from_config(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.n_votes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.update.kl_coef = 1.0  # type: ignore[misc]
    # The importance-sampling cap applies only to samples from older weights (overlap mode).
    assert opts.update.tis_cap is None
    assert StepOptions.from_config(cfg, overlap=True).update.tis_cap == cfg.rollout.tis_cap
    assert opts.n_votes == cfg.rollout.n_votes and opts.update.loss_agg == cfg.algorithm.loss_agg
