"""The label-free reward family beside majority_vote: soft majority and the intrinsic rewards, on hand-worked values."""

import math

import pytest

from ttrl.rewards import build_reward, compute_rewards
from ttrl.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def group(pid: str, answers: list[str | None], logprobs: list[list[float]] | None = None) -> Group:
    logprobs = logprobs or [[] for _ in answers]
    samples = [Sample(text=f"\\boxed{{{a}}}" if a else "no idea", answer=a, logprobs=lp,
                      token_ids=list(range(len(lp)))) for a, lp in zip(answers, logprobs)]
    return Group(prompt=Prompt(id=pid, problem=f"problem {pid}", answer="3"), prompt_token_ids=[], samples=samples)


# ── soft majority (EMPO) ───────────────────────────────────────────────────
def test_soft_majority_pays_each_class_its_share() -> None:
    groups = [group("p0", ["1/2", "0.5", "3", None]),  # 1/2 and 0.5 are one class of 2
              group("p1", ["4", "4", "4", "7"]),
              group("p2", [None, None, None, None])]
    out = compute_rewards(build_reward("soft_majority"), groups)
    assert out.rewards == [[0.5, 0.5, 0.25, 0.0], [0.75, 0.75, 0.75, 0.25], [0.0] * 4]
    # The votes it computed are the majority vote's: metrics and the guard read them.
    assert [v.label for v in out.votes] == ["1/2", "4", None]


def test_soft_majority_agrees_with_majority_vote_on_who_wins() -> None:
    groups = [group("p", ["5", "6", "5", "7", "5", "6"])]
    soft = compute_rewards(build_reward("soft_majority"), groups).rewards[0]
    hard = compute_rewards(build_reward("majority_vote"), groups).rewards[0]
    best = max(soft)
    assert [r == best for r in soft] == [r == 1.0 for r in hard]
    assert soft == [0.5, 2 / 6, 0.5, 1 / 6, 0.5, 2 / 6]


# ── token statistics: entropy and self-certainty ───────────────────────────
def stats(*rows: list[tuple[float, float]]) -> list[list[dict[str, float]]]:
    return [[{"entropy": e, "self_certainty": c} for e, c in row] for row in rows]


def test_token_entropy_rewards_low_entropy() -> None:
    groups = [group("p0", ["1", "2", "3"]), group("p1", ["1", "1"])]
    ts = stats([(0.5, 2.0), (1.5, 1.0), (0.0, 3.0)], [(2.0, 0.1), (1.0, 0.2)])
    out = compute_rewards(build_reward("token_entropy"), groups, ts)
    assert out.rewards == [[-0.5, -1.5, -0.0], [-2.0, -1.0]]
    assert out.votes is None


def test_self_certainty_rewards_certainty() -> None:
    groups = [group("p0", ["1", "2", "3"]), group("p1", ["1", "1"])]
    ts = stats([(0.5, 2.0), (1.5, 1.0), (0.0, 3.0)], [(2.0, 0.1), (1.0, 0.2)])
    out = compute_rewards(build_reward("self_certainty"), groups, ts)
    assert out.rewards == [[2.0, 1.0, 3.0], [0.1, 0.2]]


def test_a_sample_with_nothing_to_measure_gets_its_groups_lowest_reward() -> None:
    groups = [group("p0", ["1", None, "3"]), group("p1", [None, None])]
    ts = stats([(0.5, 2.0), (math.nan, math.nan), (1.0, 3.0)], [(math.nan, math.nan)] * 2)
    assert compute_rewards(build_reward("self_certainty"), groups, ts).rewards == [[2.0, 2.0, 3.0], [0.0, 0.0]]
    assert compute_rewards(build_reward("token_entropy"), groups, ts).rewards == [[-0.5, -1.0, -1.0], [0.0, 0.0]]


def test_token_stat_rewards_need_token_stats() -> None:
    with pytest.raises(ValueError, match="needs token_stats"):
        compute_rewards(build_reward("token_entropy"), [group("p0", ["1"])])


# ── trajectory log-likelihood ──────────────────────────────────────────────
def test_trajectory_logprob_sums_or_averages_the_engines_logprobs() -> None:
    groups = [group("p0", ["1", "2", None], [[-0.5, -0.25], [-1.0, -1.0, -1.0, -1.0], [-0.1]])]
    assert compute_rewards(build_reward("trajectory_logprob"), groups).rewards == [[-0.75, -4.0, -0.1]]
    per_token = compute_rewards(build_reward("trajectory_logprob", per_token=True), groups).rewards
    assert per_token == [[-0.375, -1.0, -0.1]]


def test_trajectory_logprob_never_rewards_an_empty_response_most() -> None:
    # An empty sum is 0, above every real log-likelihood: it must not win.
    groups = [group("p0", ["1", "", "2"], [[-0.5], [], [-2.0, -1.0]])]
    assert compute_rewards(build_reward("trajectory_logprob"), groups).rewards == [[-0.5, -3.0, -3.0]]


def test_every_family_member_is_label_free() -> None:
    for name in ("soft_majority", "token_entropy", "self_certainty", "trajectory_logprob"):
        assert build_reward(name).needs_ground_truth is False, name
