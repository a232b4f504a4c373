"""self_harmony: the harmonic-mean label of two views, on groups whose right answer was worked out by hand."""

import pytest

from ttrl.rewards import build_reward, compute_rewards
from ttrl.rewards.self_harmony import harmonic_scores
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, own: list[str | None], view: list[str | None] | None) -> Group:
    def samples(answers):
        return [Sample(text=f"\\boxed{{{a}}}" if a else "?", answer=a) for a in answers]

    return Group(Prompt(pid, f"problem {pid}", answer="6"), [], samples(own),
                 view_samples=None if view is None else samples(view))


def test_harmonic_scores_by_hand() -> None:
    # p = 3/6 = 0.5 and q = 1/6: 2 * 0.5 * (1/6) / (0.5 + 1/6) = (1/6) / (2/3) = 0.25.
    # p = 2/6 and q = 3/6: 2 * (1/3) * (1/2) / (5/6) = (1/3) / (5/6) = 0.4.
    # A class only one view gave scores 0.
    scores = harmonic_scores({0: 3, 1: 2, 2: 1}, {1: 3, 0: 1, 3: 2}, 6, 6)
    assert scores == pytest.approx({0: 0.25, 1: 0.4, 2: 0.0, 3: 0.0})


def test_the_answer_both_views_give_beats_the_originals_majority() -> None:
    # Own: 5 x3, 6 x2, 7 x1; reframed: 6 x3, 5 x1, 8 x2 (n = 6 each).
    # HM(5) = 0.25, HM(6) = 0.4 (above), HM(7) = HM(8) = 0: the label is 6,
    # though the original question's majority (3 of 6) says 5.
    groups = [group("p0", ["5", "5", "5", "6", "6", "7"], ["6", "6", "6", "5", "8", "8"])]
    out = compute_rewards(build_reward("self_harmony"), groups)
    assert out.rewards == [[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    vote = out.votes[0]
    # The vote the metrics see: the label that paid, over the original's classes; its ratio is 6's own share.
    assert (vote.label, vote.ratio, vote.counts) == ("6", 2 / 6, {"5": 3, "6": 2, "7": 1})


def test_no_answer_in_both_views_means_no_label_and_min_score_silences_weak_ones() -> None:
    # The views share no answer: every HM is 0, no label, nothing paid.
    apart = [group("p0", ["1", "1", "2"], ["3", "3", None])]
    out = compute_rewards(build_reward("self_harmony"), apart)
    assert out.rewards == [[0.0, 0.0, 0.0]] and out.votes[0].label is None and out.votes[0].winner is None
    # Own 4 x1 of 4 (p = 0.25), view 4 x1 of 4 (q = 0.25): HM = 0.25; equal answers "8" and "8.0" are one class.
    weak = [group("p1", ["4", "8", "9", None], ["4", "8.0", "10", "11"])]
    # HM(4) = HM(8) = 0.25: a tie goes to the answer the original gave first, 4.
    assert compute_rewards(build_reward("self_harmony"), weak).rewards == [[1.0, 0.0, 0.0, 0.0]]
    assert compute_rewards(build_reward("self_harmony", min_score=0.3), weak).rewards == [[0.0] * 4]
    assert compute_rewards(build_reward("self_harmony", min_score=0.25), weak).rewards == [[1.0, 0.0, 0.0, 0.0]]


def test_self_harmony_needs_the_reframed_samples_and_checks_its_option() -> None:
    with pytest.raises(ValueError, match="needs the second view's samples"):
        compute_rewards(build_reward("self_harmony"), [group("p0", ["1"], None)])
    with pytest.raises(ValueError, match=r"reward.self_harmony.min_score=1.5"):
        build_reward("self_harmony", min_score=1.5)
    assert build_reward("self_harmony").needs == frozenset({"views"})
