"""User feedback as reward: a thumbs-up or -down corrects the majority vote of its query.

TTRL rewards a sample for agreeing with its prompt's majority vote. When a
user rated an answer the server gave for that prompt, the rating is better
evidence than the vote, so it edits the pseudo-label before the reward is
computed:

- thumbs up (score >= 0.5) on answer A: A becomes the label (the newest
  such rating wins); samples equivalent to A get 1, the others 0;
- thumbs down (score < 0.5) on answer A: A's class is vetoed. If the largest
  class left still holds at least half of all samples, it becomes the label
  (a clear majority stands); otherwise no answer is known to be right, and
  the reward only says what the user said: 0 for samples in a vetoed class
  (or without an answer), 1 for the others.

Ratings of a response without an extractable answer say nothing about the
new samples and are ignored. Prompts nobody rated keep the base reward
(the configured label-free reward, majority vote by default). This is a
reward like the others: `compute_rewards` hands it scrubbed prompts; it
reads feedback by prompt id, never a ground-truth answer. Answers compare
as the run's `extractor` (label.extractor) reads them, as in the vote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import Vote, majority_vote
from ttrl.rewards.base import Reward, RewardOutput
from ttrl.types import Prompt


@dataclass(frozen=True)
class Rating:
    answer: str | None  # the extracted answer of the rated response
    score: float  # 1 = thumbs up, 0 = thumbs down


# A thumbs-down leaves the largest remaining class as the label only if it holds this share of all samples.
MAJORITY_LEFT = 0.5


def _vetoed(vote: Vote, ratings: Sequence[Rating], extractor: str = "boxed") -> set[int]:
    downs = [r for r in ratings if r.answer is not None and r.score < 0.5]
    return {i for i, rep in enumerate(vote.counts) if any(is_equivalent(rep, r.answer, extractor) for r in downs)}


def corrected_label(vote: Vote, ratings: Sequence[Rating], extractor: str = "boxed") -> tuple[str | None, bool]:
    """(label, changed): the pseudo-label after the ratings of this prompt.

    `changed` is False when no usable rating exists (the vote stands). A label
    of None with changed=True means "no answer is known to be right".
    """
    usable = [r for r in ratings if r.answer is not None]
    if not usable:
        return vote.label, False
    ups = [r for r in usable if r.score >= 0.5]
    if ups:
        return ups[-1].answer, True
    reps = list(vote.counts)
    vetoed = _vetoed(vote, usable, extractor)
    sizes = [(vote.counts[rep], -i) for i, rep in enumerate(reps) if i not in vetoed]
    if not sizes:
        return None, True
    size, neg_i = max(sizes)
    if size < MAJORITY_LEFT * len(vote.assignment):
        return None, True
    return reps[-neg_i], True


def corrected_rewards(vote: Vote, ratings: Sequence[Rating], extractor: str = "boxed") -> list[float] | None:
    """The rewards of one prompt's samples after its ratings; None when no rating applies."""
    label, changed = corrected_label(vote, ratings, extractor)
    if not changed:
        return None
    if label is not None:
        return rewards_for_label(vote, label, extractor)
    vetoed = _vetoed(vote, ratings, extractor)
    return [0.0 if cls is None or cls in vetoed else 1.0 for cls in vote.assignment]


def rewards_for_label(vote: Vote, label: str | None, extractor: str = "boxed") -> list[float]:
    """1.0 for each sample whose answer is equivalent to `label`, else 0.0."""
    if label is None:
        return [0.0] * len(vote.assignment)
    class_ok = [is_equivalent(rep, label, extractor) for rep in vote.counts]
    return [1.0 if cls is not None and class_ok[cls] else 0.0 for cls in vote.assignment]


def confirmed_label(label: str | None, ratings: Sequence[Rating], extractor: str = "boxed") -> str | None:
    """A regression item's label in the light of user ratings of its prompt.

    A thumbs-up answer (the newest) replaces it; a thumbs-down on it drops the
    item (None); otherwise the label stands.
    """
    usable = [r for r in ratings if r.answer is not None]
    ups = [r for r in usable if r.score >= 0.5]
    if ups:
        return ups[-1].answer
    if label is not None and any(r.score < 0.5 and is_equivalent(label, r.answer, extractor) for r in usable):
        return None
    return label


class FeedbackVoteReward(Reward):
    """The base reward, with the rows of rated prompts replaced by the corrected vote."""

    needs_ground_truth = False

    def __init__(self, base, ratings: Mapping[str, Sequence[Rating]], extractor: str = "boxed"):
        self.base = base
        self.ratings = dict(ratings)
        self.extractor = extractor
        self.corrected = 0  # prompts whose label a rating changed, in the last call

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        out = self.base(prompts, completions, answers)
        rewards = [list(r) for r in out.rewards]
        votes = list(out.votes) if out.votes is not None else None
        self.corrected = 0
        for p, prompt in enumerate(prompts):
            ratings = self.ratings.get(prompt.id)
            if not ratings:
                continue
            vote = votes[p] if votes is not None else majority_vote(answers[p], self.extractor)
            fixed = corrected_rewards(vote, ratings, self.extractor)
            if fixed is not None:
                rewards[p] = fixed
                self.corrected += 1
        return RewardOutput(rewards=rewards, votes=votes, none_count=out.none_count)


__all__ = ["FeedbackVoteReward", "Rating", "confirmed_label", "corrected_label", "corrected_rewards",
           "rewards_for_label"]
