"""`ttrl-serve` sets up its model, tokenizer and reward through the training set-up (`ttrl.parts.build_parts`).

It used to carry its own copy of that set-up; this shows that every reward a
training run can build, `reward=reward_model` included, is built the same way
for serving, without loading the data and without starting Ray (the reward
model's actor starts on its first score).
"""

from __future__ import annotations

import pytest

from ttrl.models.tiny import ensure_tiny_model, tiny_spec
from ttrl.rewards.reward_model import RewardModelReward
from ttrl.trainer.reward_model import RemoteRewardModel

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTRL_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def rm_dir(cache):
    # A tiny HF model dir stands in for a reward model: set-up only checks that it is one.
    return ensure_tiny_model(tiny_spec(64, 1, 1, 64, 128, seed=1, max_position_embeddings=256))


def _compose(config_name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from ttrl.cli import CONF_DIR
    from ttrl.config import register_configs
    from ttrl.serve.config import register_serve_configs

    register_configs()
    register_serve_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def test_serve_builds_the_reward_model_reward_like_training(rm_dir, cache):
    from ttrl.config import validate
    from ttrl.serve.config import validate_serve
    from ttrl.serve.server import _setup

    overrides = ("reward=reward_model", f"reward.path={rm_dir}", "data.local_path=/nonexistent.jsonl")
    cfg = _compose("serve", *overrides, f"serve.dir={cache / 'serve'}")
    validate_serve(cfg)
    # The data is never read (data.local_path does not exist): serving has no dataset.
    parts = _setup(cfg)
    model_path, tokenizer, reward = parts.model_path, parts.tokenizer, parts.reward
    assert parts.rt is None, "no actor at set-up"
    assert isinstance(reward, RewardModelReward) and isinstance(reward.scorer, RemoteRewardModel)
    assert reward.scorer.path == str(rm_dir)
    assert reward.scorer._actor is None, "no actor before the first score"
    assert tokenizer.pad_token_id is not None and model_path

    # Training builds the same reward from the same keys.
    from ttrl.parts import reward_options

    tcfg = _compose("config", *overrides[:2])
    validate(tcfg)
    opts = reward_options(tcfg)
    assert type(opts["scorer"]) is RemoteRewardModel and opts["scorer"].path == reward.scorer.path
    reward.close()


def test_serve_says_which_reward_model_dir_is_missing(cache):
    from ttrl.serve.server import _setup

    cfg = _compose("serve", "reward=reward_model", f"reward.path={cache / 'no_rm'}",
                   f"serve.dir={cache / 'serve'}")
    with pytest.raises(ValueError, match="no reward model there"):
        _setup(cfg)
