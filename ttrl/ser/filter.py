"""SER's data filter and stop rule: pure functions over score tables.

The reward model (RM) scores both responses of an unlabelled pair; with
p = sigmoid(score) read as "how good the RM thinks this response is", its
*learning status* on the pair decides whether the RM's own label is kept:

- status 1 (confident on both): one response above `high` and the other
  below `low` (defaults 0.55 / 0.45). The pair is kept with the response
  above `high` as chosen, whatever order the pair came in.
- status 2 (confident about the difference): otherwise, the two differ by
  more than `min_gap` (default 0.3), where "differ" is the absolute
  difference of the probabilities, |p_a - p_b|. The higher one is chosen.
- anything else: not kept now; the pair waits for a later round, when a
  better RM may be sure of it.

For the pointwise variant (one response, correct or not) only status 1
applies: p > high is labelled correct, p < low incorrect, the rest waits.

`stop_reason` says when the rounds end: no new pair passed the filter,
held-out accuracy has not improved on its best for `patience` rounds, or
`max_rounds` are done. Nothing here imports torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PairDecision",
    "PointDecision",
    "judge_pair",
    "judge_pairs",
    "judge_point",
    "judge_points",
    "rounds_without_improvement",
    "sigmoid",
    "stop_reason",
    "summarize_pairs",
    "summarize_points",
]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class PairDecision:
    """Whether a pair is kept, by which status (1, 2; 0 = not kept), and its self-label."""

    status: int
    # True: response a becomes chosen; False: b does; None: not kept.
    a_better: bool | None

    @property
    def keep(self) -> bool:
        return self.status > 0


def judge_pair(p_a: float, p_b: float, high: float = 0.55, low: float = 0.45, min_gap: float = 0.3,
               use_status2: bool = True) -> PairDecision:
    """The learning-status rule for one pair of probabilities (see the module docstring)."""
    if p_a > high and p_b < low:
        return PairDecision(1, True)
    if p_b > high and p_a < low:
        return PairDecision(1, False)
    if use_status2 and abs(p_a - p_b) > min_gap:
        return PairDecision(2, p_a > p_b)
    return PairDecision(0, None)


def judge_pairs(p_a: Sequence[float], p_b: Sequence[float], **rule: float | bool) -> list[PairDecision]:
    if len(p_a) != len(p_b):
        raise ValueError(f"{len(p_a)} scores for response a but {len(p_b)} for response b")
    return [judge_pair(a, b, **rule) for a, b in zip(p_a, p_b)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class PointDecision:
    """Pointwise: kept (status 1) with label correct/incorrect, or not kept (status 0)."""

    status: int
    correct: bool | None

    @property
    def keep(self) -> bool:
        return self.status > 0


def judge_point(p: float, high: float = 0.55, low: float = 0.45) -> PointDecision:
    if p > high:
        return PointDecision(1, True)
    if p < low:
        return PointDecision(1, False)
    return PointDecision(0, None)


def judge_points(ps: Sequence[float], high: float = 0.55, low: float = 0.45) -> list[PointDecision]:
    return [judge_point(p, high, low) for p in ps]


def summarize_pairs(decisions: Sequence[PairDecision], truth: Sequence[bool | None]) -> dict[str, float]:
    """Counts per status and the agreement of kept self-labels with the hidden truth (metrics only)."""
    kept = [(d, t) for d, t in zip(decisions, truth, strict=True) if d.keep]
    graded = [(d, t) for d, t in kept if t is not None]
    return {
        "kept_status1": float(sum(d.status == 1 for d, _ in kept)),
        "kept_status2": float(sum(d.status == 2 for d, _ in kept)),
        "kept": float(len(kept)),
        "self_label_correct": float(sum(d.a_better == t for d, t in graded)),
        "self_label_graded": float(len(graded)),
        "self_label_accuracy": (sum(d.a_better == t for d, t in graded) / len(graded)) if graded else float("nan"),
    }


def summarize_points(decisions: Sequence[PointDecision], truth: Sequence[bool | None]) -> dict[str, float]:
    kept = [(d, t) for d, t in zip(decisions, truth, strict=True) if d.keep]
    graded = [(d, t) for d, t in kept if t is not None]
    return {
        "kept_status1": float(len(kept)),
        "kept_status2": 0.0,
        "kept": float(len(kept)),
        "kept_positive": float(sum(bool(d.correct) for d, _ in kept)),
        "self_label_correct": float(sum(d.correct == t for d, t in graded)),
        "self_label_graded": float(len(graded)),
        "self_label_accuracy": (sum(d.correct == t for d, t in graded) / len(graded)) if graded else float("nan"),
    }


def rounds_without_improvement(accuracies: Sequence[float], min_delta: float = 0.0) -> int:
    """Rounds since the best held-out accuracy so far was set (0: the last round set it).

    A round improves only when it beats the best before it by more than `min_delta`.
    """
    best, since = -math.inf, 0
    for acc in accuracies:
        if acc > best + min_delta:
            best, since = acc, 0
        else:
            since += 1
    return since


def stop_reason(round_no: int, kept_new: int, accuracies: Sequence[float], max_rounds: int, patience: int,
                min_delta: float = 0.0) -> str | None:
    """Why SER stops after `round_no` (1-based self-labelling rounds), or None to go on.

    `accuracies` are the held-out accuracies so far, the seed RM's first.
    """
    if kept_new == 0:
        return f"round {round_no}: no unlabelled pair passed the filter"
    if rounds_without_improvement(accuracies, min_delta) >= patience:
        return f"held-out accuracy has not improved for {patience} round(s)"
    if round_no >= max_rounds:
        return f"ser.max_rounds={max_rounds} reached"
    return None
