"""Advantage estimators against numbers worked out by hand, plus their invariants."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ttrl.algos.advantages import (
    ADVANTAGES,
    EPS,
    TOKEN_ADVANTAGES,
    advantage_names,
    compute_advantages,
    outcome_advantages,
)
from ttrl.algos.utils import (
    discounted_cumsum_right,
    masked_mean,
    masked_var,
    masked_whiten,
    place_at_last_token,
)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # [prompts=2, samples=4]


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def whiten_by_hand(xs: list[float]) -> list[float]:
    """(x - mean) / (unbiased std + eps), with the statistics module (not the code under test)."""
    mean, std = statistics.mean(xs), statistics.stdev(xs)
    return [(x - mean) / (std + EPS) for x in xs]


# ── outcome estimators on [[1,0,0,1],[1,1,1,0]] ────────────────────────────


def test_grpo_by_hand():
    # group 1: mean 1/2, unbiased var = 4 * (1/2)^2 / 3 = 1/3
    s1 = math.sqrt(1 / 3)
    # group 2: mean 3/4, squared deviations 3 * (1/4)^2 + (3/4)^2 = 3/4, var = (3/4) / 3 = 1/4
    s2 = 0.5
    expected = [
        [0.5 / (s1 + EPS), -0.5 / (s1 + EPS), -0.5 / (s1 + EPS), 0.5 / (s1 + EPS)],
        [0.25 / (s2 + EPS), 0.25 / (s2 + EPS), 0.25 / (s2 + EPS), -0.75 / (s2 + EPS)],
    ]
    close(outcome_advantages("grpo", REWARDS), expected)


def test_dr_grpo_by_hand():
    close(outcome_advantages("dr_grpo", REWARDS), [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])


def test_rloo_by_hand():
    # r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3, ...; 1 - 2/3, 0 - 1
    close(outcome_advantages("rloo", REWARDS), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1.0]])


def test_reinforce_pp_outcome_by_hand():
    # The whole batch of 8: five 1s and three 0s, mean 5/8.
    mean = 5 / 8
    std = math.sqrt((5 * (1 - mean) ** 2 + 3 * mean**2) / 7)
    hi, lo = (1 - mean) / (std + EPS), (0 - mean) / (std + EPS)
    close(outcome_advantages("reinforce_pp", REWARDS), [[hi, lo, lo, hi], [hi, hi, hi, lo]])


def test_grpo_groups_sum_to_zero():
    rewards = torch.rand(16, 8, generator=torch.Generator().manual_seed(0))
    close(outcome_advantages("grpo", rewards).sum(dim=1), torch.zeros(16), atol=1e-4)
    close(outcome_advantages("dr_grpo", rewards).sum(dim=1), torch.zeros(16), atol=1e-5)


def test_rloo_is_scaled_dr_grpo():
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    n = rewards.shape[1]
    close(outcome_advantages("rloo", rewards), n / (n - 1) * (rewards - rewards.mean(dim=1, keepdim=True)))


def test_constant_group_gives_zero_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    for name in ("grpo", "dr_grpo", "rloo"):
        close(outcome_advantages(name, rewards), torch.zeros(2, 3))
    # reinforce_pp's baseline is the whole batch, so the batch must be constant.
    close(outcome_advantages("reinforce_pp", torch.ones(2, 3)), torch.zeros(2, 3))
    close(outcome_advantages("reinforce_pp", torch.ones(1, 1)), torch.zeros(1, 1))


def test_groups_of_one_sample():
    rewards = torch.tensor([[1.0], [0.0]])
    close(outcome_advantages("grpo", rewards), [[0.0], [0.0]])
    close(outcome_advantages("dr_grpo", rewards), [[0.0], [0.0]])
    with pytest.raises(ValueError, match=">= 2 samples"):
        outcome_advantages("rloo", rewards)


def test_integer_rewards_are_accepted():
    close(outcome_advantages("dr_grpo", torch.tensor([[1, 0]])), [[0.5, -0.5]])


def test_outcome_rejects_bad_shape_and_unknown_name():
    with pytest.raises(ValueError, match="prompts, samples"):
        outcome_advantages("grpo", torch.ones(4))
    with pytest.raises(KeyError, match="valid choices: dr_grpo, grpo, reinforce_pp, rloo"):
        outcome_advantages("ppo", REWARDS)


# ── token level: compute_advantages ───────────────────────────────────────

# 2 prompts x 2 samples, responses of 3, 2, 1 and 4 tokens (left-aligned).
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
SCORES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_outcome_estimators_broadcast_over_valid_tokens(name):
    adv, ret = compute_advantages(name, SCORES, MASK)
    per_response = outcome_advantages(name, SCORES).reshape(4, 1)
    close(adv, per_response * MASK)
    close(ret, SCORES.reshape(4, 1) * MASK)


def test_grpo_token_rewards_join_the_return_before_normalising():
    token_rewards = torch.tensor(
        [[-0.1, -0.1, -0.2, 9.0], [-0.3, 0.0, 9.0, 9.0], [-0.5, 9.0, 9.0, 9.0], [0.0, -0.1, 0.0, -0.1]]
    )  # the 9s sit on padding and must be ignored
    # R = score + sum of the response's own token rewards
    returns = [[1.0 - 0.4, 0.0 - 0.3], [0.0 - 0.5, 1.0 - 0.2]]
    adv, ret = compute_advantages("dr_grpo", SCORES, MASK, token_rewards=token_rewards)
    group_1 = [
        returns[0][0] - (returns[0][0] + returns[0][1]) / 2,
        returns[0][1] - (returns[0][0] + returns[0][1]) / 2,
    ]
    group_2 = [
        returns[1][0] - (returns[1][0] + returns[1][1]) / 2,
        returns[1][1] - (returns[1][0] + returns[1][1]) / 2,
    ]
    expected = torch.tensor(group_1 + group_2).reshape(4, 1) * MASK
    close(adv, expected)
    close(ret, torch.tensor(returns).reshape(4, 1) * MASK)


def test_reinforce_pp_tokens_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([[1.0, 0.0]])
    token_rewards = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, 99.0]])
    g = 0.5
    # rewards: row 0 [-0.1, -0.2, -0.3 + 1], row 1 [-0.4, -0.5 + 0]; returns to go, backwards:
    r0_2 = 0.7
    r0_1 = -0.2 + g * r0_2
    r0_0 = -0.1 + g * r0_1
    r1_1 = -0.5
    r1_0 = -0.4 + g * r1_1
    adv, ret = compute_advantages("reinforce_pp", scores, mask, token_rewards=token_rewards, gamma=g)
    close(ret, [[r0_0, r0_1, r0_2], [r1_0, r1_1, 0.0]])
    w = whiten_by_hand([r0_0, r0_1, r0_2, r1_0, r1_1])
    close(adv, [w[0:3], w[3:5] + [0.0]])


def test_reinforce_pp_tokens_without_token_rewards_broadcasts_the_score():
    adv, ret = compute_advantages("reinforce_pp", SCORES, MASK)
    close(ret, SCORES.reshape(4, 1) * MASK)
    # Whitened over the 10 valid tokens (token-weighted, unlike the outcome form).
    per_token = [1.0] * 3 + [0.0] * 2 + [0.0] * 1 + [1.0] * 4
    w = whiten_by_hand(per_token)
    close(adv, [w[0:3] + [0.0], w[3:5] + [0.0, 0.0], w[5:6] + [0.0] * 3, w[6:10]])


def test_gae_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([[1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 7.0]])  # 7.0 is padding: never read
    g, lam = 0.9, 0.8
    # row 0: rewards [0, 0, 1]; V after the last token is 0
    d0 = [0 + g * 0.4 - 0.5, 0 + g * 0.3 - 0.4, 1 + g * 0.0 - 0.3]
    a0_2 = d0[2]
    a0_1 = d0[1] + g * lam * a0_2
    a0_0 = d0[0] + g * lam * a0_1
    # row 1: rewards [0, 0]
    d1 = [0 + g * 0.1 - 0.2, 0 + g * 0.0 - 0.1]
    a1_1 = d1[1]
    a1_0 = d1[0] + g * lam * a1_1
    adv, ret = compute_advantages("gae", scores, mask, values=values, gamma=g, lam=lam)
    close(ret, [[a0_0 + 0.5, a0_1 + 0.4, a0_2 + 0.3], [a1_0 + 0.2, a1_1 + 0.1, 0.0]])
    w = whiten_by_hand([a0_0, a0_1, a0_2, a1_0, a1_1])
    close(adv, [w[0:3], w[3:5] + [0.0]])


def test_gae_with_token_rewards_adds_them_to_the_score():
    mask = torch.tensor([[1, 1]])
    scores = torch.tensor([[1.0]])
    values = torch.tensor([[0.0, 0.0]])
    token_rewards = torch.tensor([[-0.25, -0.5]])
    _, ret = compute_advantages("gae", scores, mask, values=values, token_rewards=token_rewards)
    # gamma = lam = 1 and V = 0: returns are plain rewards-to-go of [-0.25, 0.5]
    close(ret, [[0.25, 0.5]])


def test_gae_lam_one_returns_are_monte_carlo_whatever_the_values():
    values = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    _, ret = compute_advantages("gae", SCORES, MASK, values=values, gamma=1.0, lam=1.0)
    close(ret, SCORES.reshape(4, 1) * MASK)


def test_gae_lam_zero_advantage_is_the_td_residual():
    mask = torch.tensor([[1, 1]])
    values = torch.tensor([[0.3, 0.6]])
    _, ret = compute_advantages("gae", torch.tensor([[1.0]]), mask, values=values, gamma=0.5, lam=0.0)
    # returns = delta + V = r + gamma * V[t+1]
    close(ret, [[0 + 0.5 * 0.6, 1.0 + 0.0]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"])
def test_padding_never_matters(name):
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(4, 4, generator=gen)
    token_rewards = -0.1 * torch.rand(4, 4, generator=gen)
    kwargs = {"values": values} if name == "gae" else {}
    adv_a, ret_a = compute_advantages(name, SCORES, MASK, token_rewards=token_rewards, **kwargs)
    pad = ~MASK.bool()
    values_b = values.masked_fill(pad, 123.0)
    token_rewards_b = token_rewards.masked_fill(pad, float("nan"))
    kwargs = {"values": values_b} if name == "gae" else {}
    adv_b, ret_b = compute_advantages(name, SCORES, MASK, token_rewards=token_rewards_b, **kwargs)
    close(adv_a, adv_b)
    close(ret_a, ret_b)
    assert (adv_a[pad] == 0).all() and (ret_a[pad] == 0).all()


def test_empty_response_row_gets_zero():
    mask = torch.tensor([[1, 1], [0, 0]])
    adv, ret = compute_advantages("dr_grpo", torch.tensor([[1.0, 0.0]]), mask)
    close(adv, [[0.5, 0.5], [0.0, 0.0]])


def test_advantages_carry_no_gradient():
    values = torch.rand(4, 4, requires_grad=True)
    adv, ret = compute_advantages("gae", SCORES, MASK, values=values)
    assert not adv.requires_grad and not ret.requires_grad


def test_every_registered_name_is_accepted():
    assert advantage_names() == sorted(set(ADVANTAGES.names()) | set(TOKEN_ADVANTAGES.names()))
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"} <= set(advantage_names())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "nope"}, "valid choices: dr_grpo, gae, grpo, reinforce_pp, rloo"),
        ({"name": "gae"}, "gae needs critic values"),
        ({"name": "grpo", "gamma": 0.99}, "gamma and lam must be 1"),
        ({"name": "grpo", "values": torch.zeros(4, 4)}, "only used by gae"),
        ({"name": "reinforce_pp", "lam": 0.95}, "does not use lam"),
        ({"name": "gae", "values": torch.zeros(4, 4), "gamma": 0.0}, "gamma must be in"),
        ({"name": "grpo", "mask": torch.tensor([[1, 0, 1, 0]] * 4)}, "prefix of ones"),
        ({"name": "grpo", "scores": torch.zeros(2, 3)}, "hold 6 responses but mask has 4 rows"),
        ({"name": "grpo", "token_rewards": torch.zeros(4, 3)}, "token_rewards must have the mask's shape"),
    ],
)
def test_bad_calls_say_what_is_wrong(kwargs, match):
    args = {"scores": SCORES, "mask": MASK} | kwargs
    name = args.pop("name")
    with pytest.raises((ValueError, KeyError), match=match):
        compute_advantages(name, **args)


# ── the masked helpers underneath ─────────────────────────────────────────


def test_masked_helpers_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_mean(x, mask, dim=-1), [2.0, 4.0])
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum 5
    close(masked_var(x, mask), 5 / 3)
    close(masked_var(x, mask, unbiased=False), 5 / 4)
    close(masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]])), 0.0)
    std = math.sqrt(5 / 3)
    w = [(v - 2.5) / (std + EPS) for v in (1.0, 2.0, 3.0, 4.0)]
    close(masked_whiten(x, mask), [w[0:3], [w[3], 0.0, 0.0]])


def test_scores_land_on_the_last_valid_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    close(place_at_last_token(torch.tensor([2.0, 3.0, 4.0]), mask), [[0, 2, 0], [0, 0, 3], [0, 0, 0]])


def test_discounted_cumsum_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    # G2 = 4, G1 = 2 + 0.5 * 4, G0 = 1 + 0.5 * G1
    close(discounted_cumsum_right(rewards, torch.ones(1, 3), 0.5), [[1 + 0.5 * 4, 4.0, 4.0]])
    close(discounted_cumsum_right(rewards, torch.tensor([[1, 1, 0]]), 0.5), [[2.0, 2.0, 0.0]])
