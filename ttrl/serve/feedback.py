"""User feedback as reward: earned ratings correct the majority vote of their prompt.

TTRL rewards a sample for agreeing with its prompt's majority vote. When
users rated answers the server gave for that prompt, and their verdict is
earned (`ttrl.serve.trust.earned`: a quorum of distinct identities, or a
trusted rater), it edits the pseudo-label before the reward is computed:

- an earned thumbs-up on answer A: A becomes the label (a trusted rater's
  first, then the answer most identities chose); samples equivalent to A get
  1, the others 0;
- an earned thumbs-down on answer A: A's class is vetoed. If the largest
  class left still holds at least half of all samples, it becomes the label
  (a clear majority stands); otherwise no answer is known to be right, and
  the reward only says what the users said: 0 for samples in a vetoed class
  (or without an answer), 1 for the others.

Ratings that are not earned (one untrusted identity, however often it
repeats itself) change nothing: that prompt keeps the base reward (the
configured label-free reward, majority vote by default), exactly as if it
had not been rated. Ratings of a response without an extractable answer
say nothing about the new samples and are ignored. This is a reward like
the others: `compute_rewards` hands it scrubbed prompts; it reads feedback
by prompt id, never a ground-truth answer. Answers compare as the run's
`extractor` (label.extractor) reads them, as in the vote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import Vote, majority_vote
from ttrl.rewards.base import Reward, RewardOutput
from ttrl.serve.trust import Rating, Verdict, earned
from ttrl.types import Prompt

# A thumbs-down leaves the largest remaining class as the label only if it holds this share of all samples.
MAJORITY_LEFT = 0.5


def _vetoed(vote: Vote, verdict: Verdict, extractor: str = "boxed") -> set[int]:
    return {i for i, rep in enumerate(vote.counts)
            if any(is_equivalent(rep, answer, extractor) for answer, _ in verdict.downs)}


def corrected_label(vote: Vote, ratings: Sequence[Rating], extractor: str = "boxed",
                    quorum: int = 1) -> tuple[str | None, bool]:
    """(label, changed): the pseudo-label after the earned ratings of this prompt.

    `changed` is False when no rating is earned (the vote stands). A label of
    None with changed=True means "no answer is known to be right".
    """
    verdict = earned(ratings, quorum, extractor)
    if verdict.label is not None:
        return verdict.label, True
    if not verdict.downs:
        return vote.label, False
    reps = list(vote.counts)
    vetoed = _vetoed(vote, verdict, extractor)
    sizes = [(vote.counts[rep], -i) for i, rep in enumerate(reps) if i not in vetoed]
    if not sizes:
        return None, True
    size, neg_i = max(sizes)
    if size < MAJORITY_LEFT * len(vote.assignment):
        return None, True
    return reps[-neg_i], True


def corrected_rewards(vote: Vote, ratings: Sequence[Rating], extractor: str = "boxed",
                      quorum: int = 1) -> list[float] | None:
    """The rewards of one prompt's samples after its earned ratings; None when none is earned."""
    label, changed = corrected_label(vote, ratings, extractor, quorum)
    if not changed:
        return None
    if label is not None:
        return rewards_for_label(vote, label, extractor)
    vetoed = _vetoed(vote, earned(ratings, quorum, extractor), extractor)
    return [0.0 if cls is None or cls in vetoed else 1.0 for cls in vote.assignment]


def rewards_for_label(vote: Vote, label: str | None, extractor: str = "boxed") -> list[float]:
    """1.0 for each sample whose answer is equivalent to `label`, else 0.0."""
    if label is None:
        return [0.0] * len(vote.assignment)
    class_ok = [is_equivalent(rep, label, extractor) for rep in vote.counts]
    return [1.0 if cls is not None and class_ok[cls] else 0.0 for cls in vote.assignment]


def confirmed_label(label: str | None, ratings: Sequence[Rating], extractor: str = "boxed",
                    quorum: int = 1) -> str | None:
    """A regression item's label in the light of the earned ratings of its prompt.

    An earned thumbs-up answer replaces it; an earned thumbs-down on it drops
    the item (None); otherwise the label stands.
    """
    verdict = earned(ratings, quorum, extractor)
    if verdict.label is not None:
        return verdict.label
    if label is not None and any(is_equivalent(label, answer, extractor) for answer, _ in verdict.downs):
        return None
    return label


class FeedbackVoteReward(Reward):
    """The base reward, with the rows of prompts whose ratings are earned replaced by the corrected vote.

    `labels` records, per prompt id of the last call, the label the reward
    used and why (for the round's audit trail).
    """

    needs_ground_truth = False

    def __init__(self, base, ratings: Mapping[str, Sequence[Rating]], extractor: str = "boxed", quorum: int = 1):
        self.base = base
        self.ratings = dict(ratings)
        self.extractor = extractor
        self.quorum = quorum
        self.corrected = 0  # prompts whose label an earned rating changed, in the last call
        self.labels: dict[str, dict] = {}

    def __call__(self, prompts: list[Prompt], completions: list[list[str]],
                 answers: list[list[str | None]]) -> RewardOutput:
        out = self.base(prompts, completions, answers)
        rewards = [list(r) for r in out.rewards]
        votes = list(out.votes) if out.votes is not None else None
        self.corrected = 0
        self.labels = {}
        for p, prompt in enumerate(prompts):
            ratings = self.ratings.get(prompt.id)
            if not ratings:
                continue
            vote = votes[p] if votes is not None else majority_vote(answers[p], self.extractor)
            label, changed = corrected_label(vote, ratings, self.extractor, self.quorum)
            if not changed:
                continue
            fixed = corrected_rewards(vote, ratings, self.extractor, self.quorum)
            if fixed is not None:
                rewards[p] = fixed
                self.corrected += 1
                verdict = earned(ratings, self.quorum, self.extractor)
                self.labels[prompt.id] = {"vote": vote.label, "label": label,
                                          "ups": verdict.ups, "downs": verdict.downs}
        return RewardOutput(rewards=rewards, votes=votes, none_count=out.none_count)


__all__ = ["FeedbackVoteReward", "Rating", "confirmed_label", "corrected_label", "corrected_rewards",
           "rewards_for_label"]
