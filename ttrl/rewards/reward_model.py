"""A learned reward: a reward model (e.g. the one SER trained) scores each completion.

    ttrl-train algorithm=ppo reward=reward_model reward.path=<RM dir>

The RM dir is a Hugging Face sequence classifier with one output plus
`ttrl_rm.json` (written by ttrl/ser/ when it saves a reward model) that says
how (prompt, response) becomes its input text and whether a score is the raw
logit or its sigmoid. Each sample's reward is the RM's score of (the
prompt's problem, the completion).

This module only turns scores into rewards. The model itself runs wherever
the code that builds the run puts it: `ttrl.parts.reward_options` checks the
dir with `check_reward_model_dir` and hands in a scorer
(`ttrl.trainer.reward_model.RemoteRewardModel`, a Ray actor started on first
use) through the `RewardScorer` protocol below; tests hand in a fake. The
reward never sees ground truth (`needs_ground_truth` is False:
`compute_rewards` hands it scrubbed prompts) and returns no votes, so the loop
votes itself for its label metrics. Must never import torch, ray, vllm,
deepspeed or anything in ttrl/trainer/ (tests/unit/test_imports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SER_PATH", "RewardModelReward", "RewardScorer", "check_reward_model_dir"]

# reward.path=ser: "the RM this run's SER stage trains" (filled in by ttrl.ser.chain).
SER_PATH = "ser"


class RewardScorer(Protocol):
    """What the `reward_model` reward needs from whatever runs the reward model."""

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion) pair, in order."""
        ...

    def close(self) -> None:
        """Let the model go (an actor, GPU memory); called once, when the run ends."""
        ...


def check_reward_model_dir(path: str | None) -> str:
    """The RM dir `reward.path` names, expanded; ValueError with one sentence when it cannot be one."""
    if not path:
        raise ValueError("reward 'reward_model' needs reward.path: a reward model dir (for example "
                         "<run dir>/ser/final_rm from an SER run)")
    if path == SER_PATH:
        raise ValueError("reward.path=ser names the reward model of this run's SER stage, which has not "
                         "run: use ttrl.ser.run_ser_then_policy (ser.enabled=true) or give a model dir")
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise ValueError(f"reward.path={path}: no reward model there (no config.json)")
    return str(p)


@REWARDS.register("reward_model")
class RewardModelReward(Reward):
    needs_ground_truth = False

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
    ) -> RewardOutput:
        flat_p = [p.problem for p, row in zip(prompts, completions, strict=True) for _ in row]
        flat_c = [c for row in completions for c in row]
        scores = self.scorer.score(flat_p, flat_c) if flat_c else []
        if len(scores) != len(flat_c):
            raise ValueError(f"the reward model's scorer returned {len(scores)} scores for {len(flat_c)} "
                             "completions")
        rewards, start = [], 0
        for row in completions:
            rewards.append([float(x) for x in scores[start:start + len(row)]])
            start += len(row)
        return RewardOutput(rewards=rewards, votes=None)

    def close(self) -> None:
        self.scorer.close()
