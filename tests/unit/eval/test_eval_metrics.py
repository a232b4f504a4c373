"""pass@k, maj@k and standard errors, checked against brute force and by hand.

These are the numbers a paper reports, so each estimator is compared with the
definition it estimates: pass@k with the average over every k-subset of the
samples, maj@k with a literal vote over the first k samples.
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from ttrl.eval.metrics import maj_at_k_exact, mean_and_stderr, pass_at_k

pytestmark = pytest.mark.unit


# ── pass@k ─────────────────────────────────────────────────────────────────
def pass_at_k_brute(correct: list[bool], k: int) -> float:
    """The share of k-subsets of the samples that hold at least one correct one."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def _tables():
    """Per-sample correctness tables: every (n, c) up to n=10, shuffled."""
    rng = random.Random(0)
    for n in range(1, 11):
        for c in range(n + 1):
            table = [True] * c + [False] * (n - c)
            rng.shuffle(table)  # where the correct samples sit must not matter
            yield table


@pytest.mark.parametrize("table", list(_tables()), ids=lambda t: f"n{len(t)}-c{sum(t)}")
def test_pass_at_k_equals_the_average_over_all_k_subsets(table):
    n, c = len(table), sum(table)
    for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_brute(table, k), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(16, 3, 1), (64, 10, 8), (1000, 7, 100), (5000, 250, 64)])
def test_pass_at_k_matches_the_exact_binomial_formula_at_large_n(n, c, k):
    # 1 - C(n-c, k) / C(n, k) in exact rationals; the float product must not
    # overflow or lose the value at n in the thousands.
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_pass_at_k_edges(n):
    for k in range(1, n + 1):
        assert pass_at_k(n, 0, k) == 0.0, "nothing correct: never passes"
        assert pass_at_k(n, n, k) == 1.0, "everything correct: always passes"
    for c in range(n + 1):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n), "pass@1 is the share correct"
        assert pass_at_k(n, c, n) == (1.0 if c else 0.0), "k=n: all samples are drawn"


def test_pass_at_k_grows_with_k_and_c():
    n = 16
    for c in range(n + 1):
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert values == sorted(values)
        assert all(0.0 <= v <= 1.0 for v in values)
    for k in range(1, n + 1):
        values = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert values == sorted(values)


@pytest.mark.parametrize("n, c, k", [
    (5, 6, 1),    # more correct than samples
    (5, -1, 1),   # negative count
    (5, 2, 0),    # k below 1
    (5, 2, 6),    # k above n
    (0, 0, 1),    # no samples
])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="need"):
        pass_at_k(n, c, k)


# ── maj@k ──────────────────────────────────────────────────────────────────
def maj_at_k_brute(samples: list[tuple[int, bool]], k: int) -> float:
    """A literal vote over the first k samples, written independently of the
    implementation: count each class with list.count, break ties by the
    position where a class first appears, never let no-answer (-1) win."""
    first = samples[:k]
    classes = [cls for cls, _ in first if cls >= 0]
    if not classes:
        return 0.0
    top = max(classes.count(c) for c in classes)
    winner = min((c for c in classes if classes.count(c) == top), key=classes.index)
    return 1.0 if next(ok for cls, ok in first if cls == winner) else 0.0


def _vote_tables(count: int, seed: int = 0):
    """Random sample tables: a few answer classes (one of them correct) and no-answers."""
    rng = random.Random(seed)
    for _ in range(count):
        n_classes = rng.randint(1, 4)
        correct_cls = rng.randrange(n_classes)
        n = rng.randint(1, 12)
        yield [(cls, cls == correct_cls) for cls in (rng.randint(-1, n_classes - 1) for _ in range(n))]


def test_maj_at_k_matches_a_literal_vote():
    for table in _vote_tables(400):
        for k in range(1, len(table) + 1):
            assert maj_at_k_exact(table, k) == maj_at_k_brute(table, k), (table, k)


def test_maj_at_k_by_hand():
    # class 1 is correct, class 2 is wrong, -1 is "no answer"
    assert maj_at_k_exact([(1, True), (2, False), (1, True)], 3) == 1.0
    assert maj_at_k_exact([(2, False), (1, True), (2, False)], 3) == 0.0
    # A 1-1 tie goes to the class seen first.
    assert maj_at_k_exact([(1, True), (2, False)], 2) == 1.0
    assert maj_at_k_exact([(2, False), (1, True)], 2) == 0.0
    # No-answers never win, however many there are.
    assert maj_at_k_exact([(-1, False), (-1, False), (-1, False), (1, True)], 4) == 1.0
    assert maj_at_k_exact([(-1, False)] * 3, 3) == 0.0
    # Only the first k samples vote.
    table = [(2, False), (1, True), (1, True), (1, True)]
    assert [maj_at_k_exact(table, k) for k in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("table, k", [
    ([(1, True)], 0),
    ([(1, True)], 2),
    ([], 1),
])
def test_maj_at_k_rejects_a_k_outside_the_samples(table, k):
    with pytest.raises(ValueError, match="need"):
        maj_at_k_exact(table, k)


# ── mean and standard error ────────────────────────────────────────────────
def test_mean_and_stderr_by_hand():
    # mean 2.5; sample variance ((1.5² + 0.5²) * 2) / 3 = 5/3; stderr sqrt(5/3 / 4)
    mean, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 12))
    # Per-problem pass/fail: 3 of 4 right -> 0.75, variance 0.25, stderr 0.25.
    mean, se = mean_and_stderr([1, 0, 1, 1])
    assert (mean, se) == (pytest.approx(0.75), pytest.approx(0.25))
    # No spread, no error.
    assert mean_and_stderr([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.0))


def test_mean_and_stderr_small_inputs():
    assert mean_and_stderr([0.7]) == (0.7, 0.0)
    mean, se = mean_and_stderr([])
    assert math.isnan(mean) and math.isnan(se)
