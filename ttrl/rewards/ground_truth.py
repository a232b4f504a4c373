"""The oracle baseline: 1 if a sample's answer is equivalent to the true answer.

This is the labeled upper bound TTRL is compared against (plain GRPO/PPO on
verifiable rewards). It declares `needs_ground_truth`, so `compute_rewards`
hands it the real answers; it fails loudly on a prompt without one rather
than silently rewarding nothing. It also runs the majority vote, so that a
labeled run logs the same label-quality metrics as a label-free one. Its
grades and vote compare answers as the run's `extractor` (label.extractor)
reads them, so a reference "(C)" matches a "choice" answer "C".
"""

from __future__ import annotations

from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import majority_votes
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["GroundTruthReward"]


@REWARDS.register("ground_truth")
class GroundTruthReward(Reward):
    needs_ground_truth = True

    def __init__(self, extractor: str = "boxed"):
        self.extractor = extractor

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
    ) -> RewardOutput:
        missing = [p.id for p in prompts if p.answer is None]
        if missing:
            raise ValueError(
                f"reward 'ground_truth' needs a ground-truth answer for every prompt; "
                f"{len(missing)} have none (first: {missing[0]!r}). Use a dataset with answers "
                f"or the label-free reward 'majority_vote'."
            )
        # Each sample is graded on its own (not via its vote class) so that the
        # oracle stays exact; the grade cache makes repeated answers free.
        rewards = [
            [1.0 if a is not None and is_equivalent(a, p.answer, self.extractor) else 0.0 for a in group_answers]
            for p, group_answers in zip(prompts, answers, strict=True)
        ]
        votes = majority_votes(answers, extractor=self.extractor)
        return RewardOutput(rewards=rewards, votes=votes)
