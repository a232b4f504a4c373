"""Self-Harmony: the pseudo-label is the answer that both the question and a reframing of it give often.

Self-Harmony (Wang et al., 2025, arXiv 2511.01191) asks each question as
written and reframed, samples answers to both, and takes as pseudo-label the
answer with the highest harmonic mean of its two frequencies:

    HM(a) = 2 p(a) q(a) / (p(a) + q(a)),

p(a) the share of the original question's samples that answered a, q(a) the
share of the reframing's. The harmonic mean is high only when both are: an
answer that one phrasing produces often and the other rarely (a mistake
tied to how the question reads) loses to one that holds under both, where a
plain majority of the original's samples would have picked it. A sample of
the original question is rewarded 1 when its answer is equivalent to that
label, else 0.

What we follow: the harmonic-mean score over the two views' answer shares
(samples with no answer count in each denominator, as in the majority
vote's ratio), its argmax as the label, the 0/1 reward for agreeing with
it. What we simplify: the paper's model also plays the Reframer, writing the
paraphrase itself and being trained for it; here the reframing is a fixed
function of the problem, the second-view machinery `co_reward` uses
(`reward.view`, ttrl/data/views.py: the demo's sums with their terms
reordered), and only the original question's samples train. When no answer
appears in both views there is no label and nothing is paid: an answer only
one view supports is exactly the view-dependent answer the method exists to
refuse. `reward.self_harmony.min_score` silences labels with a weak score,
as `min_ratio` does for the majority vote. Ties go to the answer the
original question's samples gave first.

The vote it reports to the metrics is the harmonic-mean label over the
original samples' classes, so label/accuracy measures the labels that paid.
Label-free: it reads neither `prompt.answer` nor any grade.
"""

from __future__ import annotations

from ttrl.labeling.grade import equivalence_classes
from ttrl.labeling.vote import Vote
from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SelfHarmonyReward", "harmonic_scores"]


def harmonic_scores(own_sizes: dict[int, int], view_sizes: dict[int, int], n_own: int,
                    n_view: int) -> dict[int, float]:
    """HM score of every class seen in either view: 2 p q / (p + q), 0 where one view never gave it."""
    scores = {}
    for c in dict.fromkeys([*own_sizes, *view_sizes]):
        p = own_sizes.get(c, 0) / n_own if n_own else 0.0
        q = view_sizes.get(c, 0) / n_view if n_view else 0.0
        scores[c] = 2 * p * q / (p + q) if p > 0 and q > 0 else 0.0
    return scores


@REWARDS.register("self_harmony")
class SelfHarmonyReward(Reward):
    needs_ground_truth = False
    needs = frozenset({"views"})

    def __init__(self, min_score: float = 0.0, extractor: str = "boxed"):
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"reward.self_harmony.min_score={min_score} must lie in [0, 1]")
        self.min_score, self.extractor = min_score, extractor

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 view_answers: list[list[str | None]] | None = None) -> RewardOutput:
        if view_answers is None or len(view_answers) != len(answers):
            raise ValueError("self_harmony needs the reframed question's answers of every prompt")
        rewards, votes = [], []
        for own, other in zip(answers, view_answers):
            vote, score = self._vote(list(own), list(other))
            paid = vote.winner is not None and score >= self.min_score
            rewards.append([1.0 if paid and vote.agrees(i) else 0.0 for i in range(len(own))])
            votes.append(vote)
        return RewardOutput(rewards=rewards, votes=votes)

    def _vote(self, own: list[str | None], other: list[str | None]) -> tuple[Vote, float]:
        """The harmonic-mean label as a vote over `own`'s classes, and its score."""
        # Own answers first: classes come in first-seen order, so ties go to the original's first answer.
        reps, assignment = equivalence_classes(own + other, self.extractor)
        own_assign, view_assign = assignment[:len(own)], assignment[len(own):]
        own_sizes: dict[int, int] = {}
        view_sizes: dict[int, int] = {}
        for sizes, assign in ((own_sizes, own_assign), (view_sizes, view_assign)):
            for c in assign:
                if c is not None:
                    sizes[c] = sizes.get(c, 0) + 1
        scores = harmonic_scores(own_sizes, view_sizes, len(own), len(other))
        best = max(scores, key=scores.__getitem__, default=None)  # the first of equal maxima
        winner = best if best is not None and scores[best] > 0 else None
        # The classes `own` used, re-indexed compactly in first-seen order (the label always is one of them).
        used = [c for c in dict.fromkeys(own_assign) if c is not None]
        index = {c: i for i, c in enumerate(used)}
        counts = {reps[c]: own_sizes[c] for c in used}
        vote = Vote(label=None if winner is None else reps[winner],
                    ratio=own_sizes[winner] / len(own) if winner is not None else 0.0,
                    counts=counts,
                    assignment=[None if a is None else index[a] for a in own_assign],
                    winner=None if winner is None else index[winner])
        return vote, 0.0 if winner is None else scores[winner]
