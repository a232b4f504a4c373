"""Evaluation metrics over per-sample correctness: pass@k, maj@k, standard errors.

Pure Python (no torch): these numbers are what papers report, so they are
kept small enough to check by hand. Nothing here may see a rollout engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of n samples (c correct) hold a correct one.

    1 - C(n-c, k) / C(n, k), computed as a running product so that large n
    never overflows (Chen et al., 2021).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (0 for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def maj_at_k_exact(answers_correct: Sequence[tuple[int, bool]], k: int) -> float:
    """maj@k of one problem on its first k samples.

    `answers_correct` holds, per sample, (answer class id or -1 for no
    answer, whether that class is correct). The majority class of the first
    k samples (ties to the class seen first; no-answer never wins) decides.
    """
    if k < 1 or k > len(answers_correct):
        raise ValueError(f"need 1 <= k <= {len(answers_correct)}, got k={k}")
    counts: dict[int, int] = {}
    correct: dict[int, bool] = {}
    for cls, ok in answers_correct[:k]:
        if cls < 0:
            continue
        counts[cls] = counts.get(cls, 0) + 1
        correct[cls] = ok
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(c for c in counts if counts[c] == best)  # dicts keep first-seen order
    return 1.0 if correct[winner] else 0.0
