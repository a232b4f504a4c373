"""TTRL's label-free reward: 1 if a sample agrees with its prompt's majority vote.

Each prompt's answers are voted on (equivalent answers vote together); a
sample whose answer is in the winning class gets 1.0, every other sample
0.0, and a prompt where no sample answered gives all 0.0. With
`min_ratio` > 0, a prompt whose vote is weaker than that (the winning class
holds less than `min_ratio` of the samples) gives all 0.0 too: no signal
rather than a push toward a plurality that is often wrong. Answers compare
as the run's `extractor` (label.extractor) reads them: letters exactly
under "choice", numbers numerically under "number", math-verify otherwise.

Must never read `prompt.answer`: it is label-free, so `compute_rewards`
hands it scrubbed prompts, and a test checks that scrubbing changes nothing.
"""

from __future__ import annotations

from ttrl.labeling.vote import majority_votes
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["MajorityVoteReward"]


@REWARDS.register("majority_vote")
class MajorityVoteReward(Reward):
    needs_ground_truth = False

    def __init__(self, min_ratio: float = 0.0, extractor: str = "boxed"):
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"reward.min_ratio={min_ratio} must lie in [0, 1]")
        self.min_ratio = min_ratio
        self.extractor = extractor

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
    ) -> RewardOutput:
        votes = majority_votes(answers, extractor=self.extractor)
        # The vote already knows each sample's class: no answer is graded twice.
        rewards = [[1.0 if vote.ratio >= self.min_ratio and vote.agrees(i) else 0.0
                    for i in range(len(vote.assignment))] for vote in votes]
        return RewardOutput(rewards=rewards, votes=votes)
