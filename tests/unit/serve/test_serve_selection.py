"""Self-consistency selection and feedback-corrected votes."""

from __future__ import annotations

import pytest

from ttrl.labeling.vote import majority_vote
from ttrl.rewards.majority import MajorityVoteReward
from ttrl.serve.feedback import (
    FeedbackVoteReward,
    Rating,
    confirmed_label,
    corrected_label,
    corrected_rewards,
    rewards_for_label,
)
from ttrl.serve.selection import mean_logprob, select_completion
from ttrl.serve.testing import boxed
from ttrl.types import Prompt


def test_the_majority_answer_wins_over_a_more_confident_minority():
    samples = [boxed("5", (-0.01,)), boxed("7", (-1.0, -1.0)), boxed("7", (-0.2, -0.4)), boxed("7", (-3.0,))]
    sel = select_completion(samples)
    assert sel.answer == "7" and sel.agreement == pytest.approx(0.75)
    assert sel.index == 2, "within the majority class, the highest mean log-prob"
    assert sel.answers == ["5", "7", "7", "7"] and sel.counts == {"5": 1, "7": 3}


def test_equivalent_answers_vote_together():
    samples = [boxed("0.5"), boxed("2"), boxed("1/2"), boxed("2")]
    sel = select_completion(samples)
    assert sel.answer == "0.5" and sel.agreement == pytest.approx(0.5), "0.5 and 1/2 tie with 2; first seen wins"
    assert sel.index == 0


def test_no_answer_anywhere_returns_the_most_likely_completion():
    samples = [{"text": "hmm", "logprobs": [-2.0]}, {"text": "maybe", "logprobs": [-0.1, -0.3]},
               {"text": "no", "logprobs": []}]
    sel = select_completion(samples)
    assert (sel.index, sel.answer, sel.agreement) == (1, None, 0.0)
    assert mean_logprob(samples[2]) == float("-inf")


def test_ties_within_the_class_go_to_the_first_sample():
    assert select_completion([boxed("3"), boxed("3"), boxed("4")]).index == 0
    with pytest.raises(ValueError):
        select_completion([])


def test_ratings_correct_the_vote():
    vote = majority_vote(["7", "7", "5", "5", "7", None, "9"])
    assert corrected_label(vote, []) == ("7", False)
    assert corrected_label(vote, [Rating(None, 1.0)]) == ("7", False), "a rating without an answer says nothing"
    assert corrected_label(vote, [Rating("5", 1.0)]) == ("5", True)
    # Down on the majority: what is left (5: 2 of 7) is no majority, so no label ...
    assert corrected_label(vote, [Rating("7", 0.0)]) == (None, True)
    # ... and the reward only repeats the user: vetoed (or no answer) 0, anything else 1.
    assert corrected_rewards(vote, [Rating("7", 0.0)]) == [0, 0, 1, 1, 0, 0, 1]
    assert corrected_rewards(vote, [Rating("7.0", 0.0), Rating("5", 0.2)]) == [0, 0, 0, 0, 0, 0, 1]
    assert corrected_label(vote, [Rating("7", 0.0), Rating("5", 0.0), Rating("9", 0.0)]) == (None, True)
    assert corrected_label(vote, [Rating("5", 1.0), Rating("9", 1.0)]) == ("9", True), "the newest up wins"
    assert corrected_rewards(vote, [Rating("5", 1.0)]) == [0, 0, 1, 1, 0, 0, 0]
    assert corrected_rewards(vote, []) is None
    # Down on a minority answer: a clear majority left stands as the label.
    clear = majority_vote(["3", "7", "7", "7", "7", "7"])
    assert corrected_label(clear, [Rating("3", 0.0)]) == ("7", True)
    assert rewards_for_label(vote, "5") == [0, 0, 1, 1, 0, 0, 0]
    assert rewards_for_label(vote, None) == [0.0] * 7


def test_ratings_confirm_or_drop_a_frozen_label():
    assert confirmed_label("7", []) == "7"
    assert confirmed_label("7", [Rating("7.0", 0.0)]) is None, "a vetoed pseudo-label is not a yardstick"
    assert confirmed_label("7", [Rating("5", 0.0)]) == "7"
    assert confirmed_label("7", [Rating("7", 0.0), Rating("8", 1.0)]) == "8", "a confirmed answer wins"
    assert confirmed_label(None, [Rating(None, 1.0)]) is None


def test_feedback_reward_overrides_only_rated_prompts():
    prompts = [Prompt("q1", "1+1="), Prompt("q2", "2+2=")]
    answers = [["2", "3", "3"], ["4", "4", "5"]]
    completions = [[f"\\boxed{{{a}}}" for a in row] for row in answers]
    reward = FeedbackVoteReward(MajorityVoteReward(), {"q1": [Rating("3", 0.0)]})
    out = reward(prompts, completions, answers)
    assert out.rewards == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    assert reward.corrected == 1
    assert out.votes is not None and out.votes[0].label == "3", "the vote itself is kept for the metrics"
