"""Co-rewarding: a sample is rewarded for agreeing with the vote of a second view of its question.

Co-rewarding (Zhang et al., 2025, arXiv 2508.00410, its data-side variant)
asks each question twice: as written, and as a second view with the same
answer (`reward.view`, ttrl/data/views.py: the demo's sums with their terms
reordered, or a user's paraphrase function). The step samples n_votes
completions of both; the second view's samples vote, and a sample of the
original is rewarded 1 when its answer is equivalent to that vote. Under
majority_vote a sample is paid for agreeing with its own siblings, so a
mistake they share teaches itself; here the vote comes from a reading of
the question the trained samples never saw, and a mistake shared within one
phrasing does not pay. Only the original view's samples train (the paper
trains both views, each on the other's vote: twice the update for the same
signal). `min_ratio` silences weak second-view votes, as in majority_vote.

The vote this reward reports to the metrics is the second view's label
over the original samples' classes, so label/accuracy measures the labels
that paid. Label-free: it reads neither `prompt.answer` nor any grade.
"""

from __future__ import annotations

from ttrl.labeling.grade import equivalence_classes
from ttrl.labeling.vote import Vote
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["CoReward"]


@REWARDS.register("co_reward")
class CoReward(Reward):
    needs_ground_truth = False
    needs = frozenset({"views"})

    def __init__(self, min_ratio: float = 0.0, extractor: str = "boxed"):
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"reward.min_ratio={min_ratio} must lie in [0, 1]")
        self.min_ratio, self.extractor = min_ratio, extractor

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 view_answers: list[list[str | None]] | None = None) -> RewardOutput:
        if view_answers is None or len(view_answers) != len(answers):
            raise ValueError("co_reward needs the second view's answers of every prompt")
        rewards, votes = [], []
        for own, other in zip(answers, view_answers):
            vote, view_ratio = self._vote(list(own), list(other))
            paid = vote.winner is not None and view_ratio >= self.min_ratio
            rewards.append([1.0 if paid and vote.agrees(i) else 0.0 for i in range(len(own))])
            votes.append(vote)
        return RewardOutput(rewards=rewards, votes=votes)

    def _vote(self, own: list[str | None], other: list[str | None]) -> tuple[Vote, float]:
        """The second view's winning answer as a vote over `own`'s classes, and the view's majority ratio."""
        reps, assignment = equivalence_classes(other + own, self.extractor)
        view_sizes: dict[int, int] = {}
        for c in assignment[:len(other)]:
            if c is not None:
                view_sizes[c] = view_sizes.get(c, 0) + 1
        view_ratio = max(view_sizes.values()) / len(other) if view_sizes else 0.0
        own_assign = assignment[len(other):]
        # Classes in first-seen order, so max() breaks ties toward the answer the view gave first.
        winner = max(view_sizes, key=view_sizes.__getitem__) if view_sizes else None
        # Re-index the classes `own` uses (and the view's winner) compactly, in first-seen order.
        used = [c for c in dict.fromkeys(own_assign) if c is not None]
        if winner is not None and winner not in used:
            used.append(winner)
        index = {c: i for i, c in enumerate(used)}
        counts = {reps[c]: sum(1 for a in own_assign if a == c) for c in used}
        vote = Vote(label=None if winner is None else reps[winner],
                    ratio=(counts[reps[winner]] / len(own)) if winner is not None and own else 0.0,
                    counts=counts,
                    assignment=[None if a is None else index[a] for a in own_assign],
                    winner=None if winner is None else index[winner])
        return vote, view_ratio
