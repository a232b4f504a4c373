"""Fuzzing the label-free core: random and adversarial strings never raise and finish in bounded time."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttrl.labeling import grade
from ttrl.labeling.extract import extract_answer
from ttrl.labeling.vote import majority_vote

LATEXY = st.sampled_from(["\\boxed{", "\\fbox{", "{", "}", "\\frac", "^", "_", "\\sqrt", "\\left(", "\\right]",
                          "1", "2", "0.5", "x", "=", "\\pi", "\\infty", ",", " ", "\\text{cm}", "$", "9^{9^{9}}",
                          "\\begin{pmatrix}", "\\\\", "e^{", "!", "%", "\\{", "\\}"])
ADVERSARIAL = st.lists(LATEXY, max_size=40).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=200), ADVERSARIAL)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(ANY_TEXT)
def test_extract_never_raises(text):
    out = extract_answer(text)
    assert out is None or isinstance(out, str)


@FUZZ
@given(ANY_TEXT, ANY_TEXT)
def test_is_equivalent_is_total_and_bounded(a, b):
    grade.configure(timeout_s=2.0)
    t0 = time.perf_counter()
    assert grade.is_equivalent(a, b) in (True, False)
    # The bound plus a generous margin for a worker restart on a busy machine.
    assert time.perf_counter() - t0 < 2.0 + 8.0


@FUZZ
@given(st.lists(st.one_of(st.none(), ADVERSARIAL, st.sampled_from(["1/2", "0.5", "3", "\\frac{1}{2}"])),
                max_size=12))
def test_majority_vote_invariants(answers):
    grade.configure(timeout_s=2.0)
    vote = majority_vote(answers)
    assert 0.0 <= vote.ratio <= 1.0
    assert len(vote.assignment) == len(answers)
    assert sum(vote.counts.values()) == sum(c is not None for c in vote.assignment)
    assert all(c is None or 0 <= c < len(vote.counts) for c in vote.assignment)
    if vote.label is None:
        assert vote.ratio == 0.0
    else:
        assert vote.ratio * len(answers) == max(vote.counts.values())


def test_pathological_answers_finish_within_the_bound():
    grade.configure(timeout_s=1.0)
    for pred, ref in [("9^{9^{9^{9}}}", "1"), ("(10^{7})!", "2"), ("{" * 5000 + "1" + "}" * 5000, "1"),
                      ("\\frac{" * 300 + "1" + "}{2}" * 300, "0.5")]:
        t0 = time.perf_counter()
        assert grade.is_equivalent(pred, ref) in (True, False)
        assert time.perf_counter() - t0 < 1.0 + 5.0
