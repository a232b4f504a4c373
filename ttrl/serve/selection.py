"""Self-consistency: answer with the majority answer's best completion.

The server samples N completions of a query, extracts each one's final
answer, votes over equivalent answers (`majority_vote`, the same vote TTRL
uses as its pseudo-label), and returns the completion of the winning class
that the model found most likely (highest mean token log-prob, i.e. the
lowest per-token surprise; ties go to the first sample). When no sample has
an answer there is nothing to vote on, and the most likely completion
overall is returned. Pure: no ray, vllm or ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ttrl.labeling.extract import extract_answer
from ttrl.labeling.vote import Vote, majority_vote


@dataclass(frozen=True)
class Selection:
    index: int  # the chosen sample
    answer: str | None  # the vote's label (None when no sample answered)
    agreement: float  # share of all samples in the winning class
    answers: list[str | None] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def mean_logprob(sample: dict) -> float:
    """Mean log-prob per generated token; -inf without log-probs (never preferred)."""
    lps = sample.get("logprobs") or []
    return sum(lps) / len(lps) if lps else float("-inf")


def _best(candidates: Sequence[int], samples: Sequence[dict]) -> int:
    # max() keeps the first of equal maxima: ties go to the earlier sample.
    return max(candidates, key=lambda i: mean_logprob(samples[i]))


def select_completion(samples: Sequence[dict], answers: Sequence[str | None] | None = None,
                      vote: Vote | None = None, extractor: str = "boxed") -> Selection:
    """Pick the completion to serve among `samples` (engine dicts with "text" and "logprobs").

    Without `answers`, each sample's answer is read by `extractor` (label.extractor); without
    `vote`, they are voted on as `extractor` compares them.
    """
    if not samples:
        raise ValueError("select_completion needs at least one sample")
    if answers is None:
        answers = [extract_answer(s["text"], extractor) for s in samples]
    answers = list(answers)
    vote = vote if vote is not None else majority_vote(answers, extractor)
    if vote.winner is None:
        return Selection(_best(range(len(samples)), samples), None, 0.0, answers, {})
    members = [i for i, cls in enumerate(vote.assignment) if cls == vote.winner]
    return Selection(_best(members, samples), vote.label, vote.ratio, answers, dict(vote.counts))


__all__ = ["Selection", "mean_logprob", "select_completion"]
