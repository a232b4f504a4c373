"""Every label-free reward trains a real step: Ray local cluster, vLLM CPU engines, DeepSpeed ZeRO-3 on gloo.

One runtime serves all the rewards (a start-up costs most of a minute): each
reward is built by name as a run builds it and drives one `step`. The
token-statistics pass is checked against the trainer's own entropy: with
every sample trained in one mini-batch, the token-weighted mean of the
per-sample entropies the reward saw must equal the update's train/entropy,
computed in the update's own forward pass.
"""

from __future__ import annotations

import math
import random

import pytest

from tests.conftest import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FAMILY = ["soft_majority", "token_entropy", "self_certainty", "trajectory_logprob", "co_reward", "random",
          # The methods built for the regime where the vote is wrong (issue 33): one real step each too.
          "self_harmony", "evol_rl", "tool_verified", "scrl", "rent"]


def test_each_label_free_reward_trains_a_real_step():
    from ttrl.distributed.runtime import Runtime
    from ttrl.parts import build_parts, reward_options, with_views
    from ttrl.rewards import build_reward
    from ttrl.rewards.intrinsic import TokenEntropyReward
    from ttrl.step import StepContext, StepOptions, step

    # n_train = n_votes and one mini-batch: the update's entropy covers exactly the samples the reward saw.
    cfg = compose_config("experiment=debug", "rollout.n_train=8", "trainer.mini_batch_size=32",
                         "trainer.lr=1e-3", "logger.progress=false")
    setup = build_parts(cfg)
    rt = Runtime(cfg, setup.model_path, total_opt_steps=len(FAMILY) + 1)
    opts = StepOptions.from_config(cfg)
    seen = {}

    class Recorded(TokenEntropyReward):
        """token_entropy, keeping what it was handed (the test's window into the step)."""

        def __call__(self, prompts, completions, answers, token_stats=None):
            seen["stats"] = token_stats
            return super().__call__(prompts, completions, answers, token_stats=token_stats)

    try:
        ctx = StepContext(rt, setup.reward, setup.tokenizer, opts, random.Random(0))
        per = cfg.data.prompts_per_step
        rows = {}
        for i, name in enumerate(FAMILY):
            cfg.reward.name = name  # what reward_options reads, as `reward=<name>` would set it
            ctx.reward = Recorded() if name == "token_entropy" else build_reward(name, **reward_options(cfg))
            prompts = setup.prompts[(i * per) % len(setup.prompts):][:per]
            if name in ("co_reward", "self_harmony"):  # their prompts carry a second view, as build_parts makes them
                cfg.reward.view = "reorder_terms"
                prompts = with_views(prompts, cfg, setup.tokenizer)
                assert all(p.view_text and p.view_text != p.text for p in prompts)
            rows[name] = step(ctx, prompts)
            cfg.reward.view = None
        before = rt.policy.call("fingerprint")[0]
        rows["again"] = step(ctx, setup.prompts[:per])
        assert rt.policy.call("fingerprint")[0] != pytest.approx(before, rel=1e-9), "the step did not train"
    finally:
        rt.shutdown()

    for name, row in rows.items():
        for key in ("reward/mean", "reward/std", "train/pg_loss", "train/entropy"):
            assert math.isfinite(row[key]), (name, key, row[key])
    # The tiny random model writes no \boxed{}: the votes have nothing to pay.
    assert rows["soft_majority"]["reward/mean"] == 0.0 and rows["co_reward"]["reward/mean"] == 0.0
    # The intrinsic rewards tell samples apart, on their own scales.
    for name in ("token_entropy", "self_certainty", "trajectory_logprob"):
        assert rows[name]["reward/std"] > 0, name
    assert rows["token_entropy"]["reward/mean"] < 0 < rows["self_certainty"]["reward/mean"]
    assert rows["trajectory_logprob"]["reward/mean"] < 0
    assert 0.0 < rows["random"]["reward/mean"] < 1.0
    # No \boxed{} answers: the vote-based methods pay no positive reward, RENT pays minus an entropy.
    assert rows["self_harmony"]["reward/mean"] == 0.0 and rows["tool_verified"]["reward/mean"] == 0.0
    assert rows["rent"]["reward/mean"] < 0 and rows["rent"]["reward/std"] > 0
    assert "timing/token_stats" in rows["token_entropy"] and "timing/token_stats" in rows["self_certainty"]
    assert "timing/token_stats" not in rows["trajectory_logprob"]

    # The token-statistics pass agrees with the update's forward pass.
    stats = [s for group in seen["stats"] for s in group]
    assert all(s["tokens"] > 0 and math.isfinite(s["entropy"]) and s["self_certainty"] >= 0 for s in stats)
    weighted = sum(s["entropy"] * s["tokens"] for s in stats) / sum(s["tokens"] for s in stats)
    assert weighted == pytest.approx(rows["token_entropy"]["train/entropy"], abs=2e-3)
