"""The safety gate: is the learner's candidate at least as good as what is served?

Both the current weights and the candidate answer the same regression set
with the same sampling seed (so they draw with the same random numbers);
`score_samples` turns their samples into an `EvalResult`, and `decide`
compares the two:

- the regression score: the share of samples whose answer is equivalent to
  the item's label, where labels are the ground truth of a labelled set the
  user gave, or else come from frozen, held-out earlier queries: the majority
  answer where at least `gate.min_agreement` of the samples agreed, or an
  answer a user gave a thumbs-up (a thumbs-down on a frozen label drops the
  item). A candidate scoring more than `gate.tolerance` below the current
  weights is rejected;
- collapse signals, candidate against current on the same prompts: token
  entropy (the mean negative log-prob of the sampled tokens) falling by more
  than `max_entropy_drop` of its value, the share of samples with an answer
  falling by more than `max_answer_rate_drop`, the mean response length
  changing by more than `max_length_change` of its value;
- what the learner saw while training the candidate: non-finite (skipped)
  updates and collapse-detector events (ttrl/metrics/safety.py).

An empty regression set promotes nothing: without a yardstick, the gate
cannot say "not worse". Pure Python on samples and labels: no ray, no vllm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ttrl.labeling.extract import extract_answer
from ttrl.labeling.grade import is_equivalent
from ttrl.labeling.vote import majority_vote


@dataclass(frozen=True)
class EvalResult:
    score: float  # mean share of samples agreeing with the item's label
    answer_rate: float  # share of samples with an extractable answer
    entropy: float  # mean negative log-prob per sampled token
    mean_length: float  # tokens per sample
    self_agreement: float  # mean majority ratio of the model's own samples
    n_items: int
    n_samples: int
    item_scores: tuple[float, ...] = ()  # per item, for a paired comparison

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("item_scores")
        return d


def paired_stderr(a: EvalResult, b: EvalResult) -> float | None:
    """Standard error of the mean per-item score difference (same items, same order)."""
    if len(a.item_scores) != len(b.item_scores) or len(a.item_scores) < 2:
        return None
    d = [y - x for x, y in zip(a.item_scores, b.item_scores)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return (var / len(d)) ** 0.5


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)  # why not (empty when promoted)
    delta: float = 0.0  # candidate score - current score


def score_samples(labels: Sequence[str], samples: Sequence[Sequence[dict]], extractor: str = "boxed") -> EvalResult:
    """Score one model's samples ([items][n] engine dicts) against the items' labels.

    Answers are read and compared by `extractor` (label.extractor), as the learner's votes read them.
    """
    if len(labels) != len(samples):
        raise ValueError(f"{len(labels)} labels for {len(samples)} items")
    scores, agree, n_samples, answered, tokens, nll = [], [], 0, 0, 0, 0.0
    for label, row in zip(labels, samples):
        answers = [extract_answer(s["text"], extractor) for s in row]
        vote = majority_vote(answers, extractor)
        # Grade each answer class once against the label.
        class_ok = [is_equivalent(rep, label, extractor) for rep in vote.counts]
        ok = [cls is not None and class_ok[cls] for cls in vote.assignment]
        scores.append(sum(ok) / max(len(row), 1))
        agree.append(vote.ratio)
        n_samples += len(row)
        answered += sum(a is not None for a in answers)
        for s in row:
            lps = s.get("logprobs") or []
            tokens += len(s.get("token_ids") or lps)
            nll -= sum(lps)
    n = max(len(labels), 1)
    return EvalResult(
        score=sum(scores) / n, answer_rate=answered / max(n_samples, 1), entropy=nll / max(tokens, 1),
        mean_length=tokens / max(n_samples, 1), self_agreement=sum(agree) / n, n_items=len(labels),
        n_samples=n_samples, item_scores=tuple(scores))


def decide(current: EvalResult, candidate: EvalResult, gate: Any,
           training_events: Sequence[str] = ()) -> GateDecision:
    """Promote the candidate, or say why not (`gate` holds the serve.gate keys)."""
    reasons: list[str] = []
    delta = candidate.score - current.score
    if current.n_items == 0 or candidate.n_items == 0:
        reasons.append("no regression set yet (no labelled set given, no query reached "
                       f"gate.min_agreement={gate.min_agreement:g} and no answer got a thumbs-up): nothing to compare on")
    elif delta < -gate.tolerance:
        se = paired_stderr(current, candidate)
        noise = f", difference {delta:+.3f} ± {se:.3f} s.e. over {current.n_items} items" if se is not None else ""
        reasons.append(f"regression score fell from {current.score:.3f} to {candidate.score:.3f} "
                       f"(more than gate.tolerance={gate.tolerance:g}{noise})")
    if gate.max_entropy_drop is not None and current.entropy > 0 and \
            candidate.entropy < current.entropy * (1 - gate.max_entropy_drop):
        reasons.append(f"token entropy collapsed from {current.entropy:.3f} to {candidate.entropy:.3f} "
                       f"(more than gate.max_entropy_drop={gate.max_entropy_drop:g} of it)")
    if gate.max_answer_rate_drop is not None and \
            candidate.answer_rate < current.answer_rate - gate.max_answer_rate_drop:
        reasons.append(f"share of samples with an answer fell from {current.answer_rate:.3f} to "
                       f"{candidate.answer_rate:.3f} (more than gate.max_answer_rate_drop={gate.max_answer_rate_drop:g})")
    if gate.max_length_change is not None and current.mean_length > 0 and \
            abs(candidate.mean_length / current.mean_length - 1) > gate.max_length_change:
        reasons.append(f"mean response length moved from {current.mean_length:.1f} to {candidate.mean_length:.1f} "
                       f"tokens (more than gate.max_length_change={gate.max_length_change:g} of it)")
    reasons.extend(f"training: {e}" for e in training_events)
    return GateDecision(promote=not reasons, reasons=reasons, delta=delta)


def freezable(votes_ratio: Sequence[float], labels: Sequence[str | None], min_agreement: float) -> list[int]:
    """Indices of queries whose vote is confident enough to freeze as a pseudo-label."""
    return [i for i, (r, lab) in enumerate(zip(votes_ratio, labels)) if lab is not None and r >= min_agreement]


__all__ = ["EvalResult", "GateDecision", "decide", "freezable", "paired_stderr", "score_samples"]
