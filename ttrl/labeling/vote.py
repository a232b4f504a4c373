"""Majority vote over a prompt's sampled answers: TTRL's pseudo-label.

Equivalent answers ("1/2", "0.5", "\\frac{1}{2}") form one class; the largest
class wins and its first-seen member is the pseudo-label. A tie goes to the
class seen first. Missing answers (no `\\boxed{}`) vote for nothing but
count in the denominator of the majority ratio, so a prompt where most
samples give no answer has a low ratio. Which answers are equivalent
depends on the run's extractor (grade.py, match.py): "C" and "(C)" under
"choice", "0.5" and "1/2" under "number" and "boxed".

The `Vote` keeps each sample's class, so rewards and metrics read the
verdict from it instead of grading again. This module must never see a
ground-truth answer, and imports neither torch, ray, vllm nor deepspeed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ttrl.labeling.grade import equivalence_classes, parallel_checks
from ttrl.labeling.match import matching

__all__ = ["Vote", "majority_vote", "majority_votes"]


@dataclass(frozen=True)
class Vote:
    """The outcome of one prompt's vote."""

    # Representative (first-seen member) of the winning class; None if no sample answered.
    label: str | None
    # Winning class size / number of samples (samples without an answer included).
    ratio: float
    # Representative -> class size, classes in first-seen order.
    counts: dict[str, int] = field(default_factory=dict)
    # Class index of each sample (an index into `counts`), None where it gave no answer.
    assignment: list[int | None] = field(default_factory=list)
    # Index of the winning class; None if no sample answered.
    winner: int | None = None

    @property
    def margin(self) -> float:
        """How far the winner leads the runner-up, as a share of all samples.

        A vote of 7 against 6 (of 16) has ratio 0.44 but margin 0.06: a coin
        toss between two answers, which a ratio alone does not show.
        """
        if self.winner is None:
            return 0.0
        sizes = sorted(self.counts.values(), reverse=True)
        return (sizes[0] - (sizes[1] if len(sizes) > 1 else 0)) / len(self.assignment)

    def agrees(self, sample: int) -> bool:
        """Whether sample `sample`'s answer is in the winning class."""
        return self.winner is not None and self.assignment[sample] == self.winner


def majority_vote(answers: Sequence[str | None], extractor: str = "boxed") -> Vote:
    """Vote over one prompt's answers, read by `extractor` (None where a sample gave none)."""
    representatives, assignment = equivalence_classes(answers, extractor)
    if not representatives:
        return Vote(label=None, ratio=0.0, assignment=assignment)
    sizes = [0] * len(representatives)
    for cls in assignment:
        if cls is not None:
            sizes[cls] += 1
    # max() returns the first of equal maxima, and classes are in first-seen
    # order: ties go to the class seen first.
    winner = max(range(len(sizes)), key=sizes.__getitem__)
    return Vote(
        label=representatives[winner],
        ratio=sizes[winner] / len(answers),
        counts=dict(zip(representatives, sizes, strict=True)),
        assignment=assignment,
        winner=winner,
    )


def majority_votes(answer_lists: Sequence[Sequence[str | None]], extractor: str = "boxed") -> list[Vote]:
    """One vote per prompt, prompts voted side by side when grading allows it.

    A prompt whose samples give many distinct symbolic answers can need
    thousands of checks (~10 ms each in sympy); the checks run in grading
    worker processes, so threads here spread them over those workers.
    Typed answers (`extractor` "choice" or "number") compare in microseconds,
    in this thread.
    """
    lanes = 1 if matching(extractor) is not None else min(parallel_checks(), len(answer_lists))
    if lanes <= 1:
        return [majority_vote(answers, extractor) for answers in answer_lists]
    vote = functools.partial(majority_vote, extractor=extractor)
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="ttrl-vote") as pool:
        return list(pool.map(vote, answer_lists))
