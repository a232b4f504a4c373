"""EMPO's soft majority: each sample is rewarded by the share of samples that gave its answer.

EMPO (Zhang et al., 2025, arXiv 2504.05812) minimises the semantic entropy
of a prompt's answers: the samples are clustered by meaning (here: the
equivalence classes of their extracted answers, the classes the majority
vote uses), and a sample in class c gets reward |c| / n, n the number of
samples. Where majority_vote gives 1 to the winning class and 0 to the rest,
this pays every class in proportion to its support, so a 9-7 vote between
two answers rewards both, 0.56 and 0.44, instead of betting everything on
the 9. A sample with no answer gets 0.

Label-free: it never reads `prompt.answer` (`compute_rewards` hands it
scrubbed prompts).
"""

from __future__ import annotations

from ttrl.labeling.vote import majority_votes
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SoftMajorityReward"]


@REWARDS.register("soft_majority")
class SoftMajorityReward(Reward):
    needs_ground_truth = False

    def __init__(self, extractor: str = "boxed"):
        self.extractor = extractor

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        votes = majority_votes(answers, extractor=self.extractor)
        rewards = []
        for vote in votes:
            sizes = list(vote.counts.values())
            n = len(vote.assignment)
            rewards.append([0.0 if c is None else sizes[c] / n for c in vote.assignment])
        return RewardOutput(rewards=rewards, votes=votes)
