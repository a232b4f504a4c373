"""scrl: strict-consensus positives and entropy-gated negatives, on groups worked out by hand."""

import math

import pytest

from ttrl.rewards import build_reward, compute_rewards
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, answers: list[str | None]) -> Group:
    return Group(Prompt(pid, f"problem {pid}", answer="5"), [],
                 [Sample(text=f"\\boxed{{{a}}}" if a else "?", answer=a) for a in answers])


def stats(*rows: list[float]) -> list[list[dict[str, float]]]:
    return [[{"entropy": h, "self_certainty": 0.0} for h in row] for row in rows]


# n = 10: 5 x6, 7 x2, 8 x1, 9 x1.  Shares 0.6, 0.2, 0.1, 0.1.
# Entropies: the 5s 0.2 each, the 7s 0.5, the 8 1.0, the 9 0.1.
# Prompt mean H = (6*0.2 + 2*0.5 + 1.0 + 0.1) / 10 = 3.3 / 10 = 0.33.
# Positive: 0.6 >= tau_pos 0.375 and 0.6 - 0.2 = 0.4 > tau_marg 0.125 -> 5.
# Negatives: share < tau_low 0.125 and class H >= 0.33: 8 (0.1, 1.0) yes; 9 (0.1, but H 0.1) no.
ANSWERS = ["5"] * 6 + ["7", "7", "8", "9"]
ENTROPY = [0.2] * 6 + [0.5, 0.5, 1.0, 0.1]


def test_binary_mode_by_hand() -> None:
    out = compute_rewards(build_reward("scrl", mode="binary"), [group("p0", ANSWERS)], stats(ENTROPY))
    # +1 for the positive, -1 for the negative 8, 0 for the 7s and the confident 9.
    assert out.rewards == [[1.0] * 6 + [0.0, 0.0, -1.0, 0.0]]
    assert out.votes[0].label == "5"  # the plain majority, for the metrics and the guard


def test_continuous_mode_by_hand() -> None:
    # lambda_h = 0.1, a_plus = a_minus = 1:
    #   5: 1 * 0.6 - 0.1 * (0.2 - 0.33)            =  0.6 + 0.013 =  0.613
    #   7:         - 0.1 * (0.5 - 0.33)            = -0.017
    #   8: -(0.125 - 0.1) - 0.1 * (1.0 - 0.33)     = -0.025 - 0.067 = -0.092
    #   9:         - 0.1 * (0.1 - 0.33)            =  0.023
    out = compute_rewards(build_reward("scrl"), [group("p0", ANSWERS)], stats(ENTROPY))
    assert out.rewards[0] == pytest.approx([0.613] * 6 + [-0.017, -0.017, -0.092, 0.023])


def test_weak_consensus_has_no_positive_and_no_answer_costs_one() -> None:
    # n = 10: 4 x4, 6 x3, 3 x2, one sample without an answer.  4 holds 0.4 >= 0.375, but leads 6 by
    # 0.1, not more than 0.125: no positive label.  No share is below 0.125: no negatives either.
    answers = ["4"] * 4 + ["6"] * 3 + ["3"] * 2 + [None]
    out = compute_rewards(build_reward("scrl", mode="binary"), [group("p0", answers)], stats([0.3] * 10))
    assert out.rewards == [[0.0] * 9 + [-1.0]]
    # Stricter margins or shares change which prompts get a positive: tau_marg 0.05 lets 4 through.
    out = compute_rewards(build_reward("scrl", mode="binary", tau_marg=0.05), [group("p0", answers)],
                          stats([0.3] * 10))
    assert out.rewards == [[1.0] * 4 + [0.0] * 5 + [-1.0]]


def test_a_lone_answer_is_positive_and_unmeasured_entropy_gates_nothing() -> None:
    # One answer class holding 3 of 4 (0.75 >= 0.375, no runner-up): positive.  The fourth sample's
    # entropy is NaN (no tokens) and it gave no answer: -1, and it is left out of the prompt's mean.
    out = compute_rewards(build_reward("scrl"), [group("p0", ["2", "2", "2", None])],
                          stats([0.4, 0.4, 0.4, math.nan]))
    # Continuous: 1 * 0.75 - 0.1 * (0.4 - 0.4) = 0.75.
    assert out.rewards[0] == pytest.approx([0.75, 0.75, 0.75, -1.0])


def test_scrl_needs_token_stats_and_checks_its_options() -> None:
    with pytest.raises(ValueError, match="needs token_stats"):
        compute_rewards(build_reward("scrl"), [group("p0", ["1"])])
    with pytest.raises(ValueError, match=r"reward.scrl.mode='soft'"):
        build_reward("scrl", mode="soft")
    with pytest.raises(ValueError, match=r"reward.scrl.tau_pos=2"):
        build_reward("scrl", tau_pos=2)
    with pytest.raises(ValueError, match=r"reward.scrl.lambda_h=-1"):
        build_reward("scrl", lambda_h=-1)
