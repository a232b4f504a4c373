"""majority_vote: classes of equivalent answers, ties, None answers, cost."""

import random

import pytest

from ttrl.labeling.grade import grade_stats, reset_stats
from ttrl.labeling.vote import Vote, majority_vote, majority_votes

pytestmark = pytest.mark.unit


def test_equivalent_answers_vote_together() -> None:
    vote = majority_vote(["1/2", "0.5", r"\frac{1}{2}", "3"])
    assert vote.label == "1/2"  # the first-seen member represents the class
    assert vote.ratio == 0.75
    assert vote.counts == {"1/2": 3, "3": 1}
    assert vote.assignment == [0, 0, 0, 1]
    assert vote.winner == 0
    assert [vote.agrees(i) for i in range(4)] == [True, True, True, False]


def test_latex_variants_merge() -> None:
    vote = majority_vote([r"\left(1,2\right]", "7", "(1, 2]", r"$(1,2]$"])
    assert vote.label == r"\left(1,2\right]" and vote.counts[vote.label] == 3


def test_tie_goes_to_the_class_seen_first() -> None:
    assert majority_vote(["5", "7", "7", "5"]).label == "5"
    assert majority_vote(["7", "5", "5", "7"]).label == "7"
    assert majority_vote(["a", "b", "c"]).label == "a"


def test_none_answers_count_in_the_denominator() -> None:
    vote = majority_vote(["4", None, None, "4", "2", None])
    assert vote.label == "4"
    assert vote.ratio == pytest.approx(2 / 6)
    assert vote.assignment == [0, None, None, 0, 1, None]
    assert not vote.agrees(1)


@pytest.mark.parametrize("answers", [[], [None], [None, None, None], ["", "  "]])
def test_no_answers_no_label(answers: list) -> None:
    vote = majority_vote(answers)
    assert vote == Vote(label=None, ratio=0.0, counts={}, assignment=[None] * len(answers), winner=None)
    assert not any(vote.agrees(i) for i in range(len(answers)))


def test_majority_wins_over_first_seen() -> None:
    vote = majority_vote(["1", "2", "2", "3", "2", "1"])
    assert (vote.label, vote.ratio, vote.winner) == ("2", 0.5, 1)
    assert list(vote.counts) == ["1", "2", "3"]  # first-seen order


@pytest.mark.parametrize("answers, margin", [
    (["1", "2", "2", "3", "2", "1"], 1 / 6),      # 3 against 2: a lead of one sample in six
    (["7", "7", "7", "7"], 1.0),                  # unanimous
    (["4", None, None, "4", "2", None], 1 / 6),   # missing answers count in the denominator
    (["5", "7", "7", "5"], 0.0),                  # a tie: the winner leads nobody
    ([None, None], 0.0),                          # no vote at all
])
def test_margin_is_the_lead_over_the_runner_up(answers: list, margin: float) -> None:
    assert majority_vote(answers).margin == pytest.approx(margin)


def test_grading_cost_is_bounded_by_distinct_answers() -> None:
    # 64 samples, 5 distinct answers (two of which are equivalent spellings,
    # one rewritten with extra spaces): the vote must not compare 64 x 64 pairs.
    rng = random.Random(0)
    pool = ["12", "0.5", "1/2", "x+1", r"\sqrt{2}", " 12 "]
    answers = [rng.choice(pool) for _ in range(64)]
    reset_stats()
    vote = majority_vote(answers)
    stats = grade_stats()
    # 5 distinct normalised strings, compared only with class representatives:
    # at most 0 + 1 + 2 + 3 + 3 = 9 checks.
    assert stats.calls <= 9
    assert stats.verify_calls <= 9
    assert sum(vote.counts.values()) == 64 and len(vote.counts) == 4


def test_votes_side_by_side_match_one_by_one() -> None:
    answer_lists = [
        ["1/2", "0.5", "3", None],
        [f"x^{k} + {k}" for k in range(6)] + ["x^{2}+2"],
        [None, None],
        [],
        [r"\{1,2\}", r"\{2,1\}", "7"],
    ]
    assert majority_votes(answer_lists) == [majority_vote(answers) for answers in answer_lists]
