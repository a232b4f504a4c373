"""A random reward: the control arm every label-free reward is measured against.

Each sample gets 1.0 with probability `p`, else 0.0, from a generator seeded
once (`reward.seed`, or the run's seed), so a run reproduces its rewards.
It reads neither answers nor completions: whatever a run gains with it comes
from the update itself (clipping, the optimiser, the data), not from any
information about right answers. Spurious Rewards (Shao et al., 2025,
arXiv 2506.10947) found such rewards moving Qwen2.5-Math-7B by +21 points on
MATH-500, so a label-free reward earns credit only above this line.
"""

from __future__ import annotations

import random

from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["RandomReward"]


@REWARDS.register("random")
class RandomReward(Reward):
    needs_ground_truth = False

    def __init__(self, p: float = 0.5, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"reward.p={p} must lie in [0, 1]")
        self.p = p
        self.rng = random.Random(seed)

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        return RewardOutput(rewards=[[float(self.rng.random() < self.p) for _ in row] for row in completions])
