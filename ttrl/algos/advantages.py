"""Advantage estimators: from rewards (and values) to per-token advantages.

Two registries, one per kind of estimator:

- `ADVANTAGES` holds *outcome* estimators. They see one scalar return per
  response, grouped by prompt: rewards [prompts, samples] -> advantages of the
  same shape (`outcome_advantages`). The whole response is one action, so
  there is no time axis, no discount and no critic: grpo, dr_grpo, rloo and
  the outcome form of reinforce_pp.
- `TOKEN_ADVANTAGES` holds *token-level* estimators, which need per-token
  rewards or values and a time axis: reinforce_pp (discounted returns,
  whitened over tokens) and gae (PPO with a critic).

`compute_advantages` is what the training loop calls: it takes the scores
[prompts, samples] and the response mask [prompts * samples, seq] (rows in
prompt-major order: row p * samples + s is sample s of prompt p) and returns
token-level (advantages, returns), each [batch, seq], zero on padding. A
token-level estimator is used when one is registered under the name;
otherwise the outcome estimator of that name is broadcast over tokens.

Token rewards (e.g. -kl_coef * kl, when the KL is a reward penalty) with an
outcome estimator: the response is still one action, so its return is the
score plus the undiscounted sum of its token rewards,
    R_i = score_i + sum_t token_rewards[i, t],
and the group statistics are taken over these R_i. This is the return of the
KL-regularised objective E[r - beta * KL], and it reduces exactly to the plain
estimator when token_rewards is None. Discounting (gamma != 1) or GAE's lam
would be silently meaningless there, so they are refused.

Every function here is pure and runs under no_grad: advantages are targets,
never differentiated through. This module must never import ray, vllm or
deepspeed, and must never see ground-truth answers (only rewards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ttrl.algos.utils import (
    as_float,
    check_prefix_mask,
    discounted_cumsum_right,
    masked_whiten,
    place_at_last_token,
)
from ttrl.registry import Registry

# Added to standard deviations before dividing, so that a group whose rewards
# are all equal (std 0) gets advantages of exactly 0 instead of nan.
EPS = 1e-6

OutcomeEstimator = Callable[[Tensor], Tensor]
ADVANTAGES: Registry[OutcomeEstimator] = Registry("advantage estimator")


class TokenEstimator(Protocol):
    """(scores [batch], mask [batch, seq], ...) -> (advantages, returns), each [batch, seq]."""

    def __call__(
        self,
        scores: Tensor,  # [batch]
        mask: Tensor,  # [batch, seq]
        *,
        values: Tensor | None,
        token_rewards: Tensor | None,
        gamma: float,
        lam: float,
    ) -> tuple[Tensor, Tensor]: ...


TOKEN_ADVANTAGES: Registry[TokenEstimator] = Registry("token-level advantage estimator")


# ── outcome estimators: rewards [prompts, samples] -> advantages, same shape ──


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor) -> Tensor:
    """GRPO: (r - group mean) / (group std + 1e-6), std unbiased (n - 1).

    A group of one sample carries no comparison, so its advantage is 0
    (the unbiased std of one value is undefined).
    """
    r = as_float(rewards)  # [prompts, samples]
    if r.shape[1] == 1:
        return torch.zeros_like(r)
    mean = r.mean(dim=1, keepdim=True)  # [prompts, 1]
    std = r.std(dim=1, unbiased=True, keepdim=True)  # [prompts, 1]
    return (r - mean) / (std + EPS)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor) -> Tensor:
    """Dr. GRPO: r - group mean, without dividing by the std.

    Dividing by the std up-weights prompts that are nearly always right or
    nearly always wrong (small std); Dr. GRPO drops it to remove that bias.
    A group of one sample gets 0.
    """
    r = as_float(rewards)  # [prompts, samples]
    return r - r.mean(dim=1, keepdim=True)


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out: r_i minus the mean of the *other* samples.

    Leaving r_i out of its own baseline keeps the estimate unbiased. It equals
    N / (N - 1) * (r_i - group mean). Needs at least 2 samples per prompt.
    """
    r = as_float(rewards)  # [prompts, samples]
    n = r.shape[1]
    if n < 2:
        raise ValueError(f"rloo needs >= 2 samples per prompt to leave one out, got {n}")
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (n - 1)  # [prompts, samples]
    return r - others_mean


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor) -> Tensor:
    """REINFORCE++ (outcome form): (r - batch mean) / (batch std + 1e-6).

    The baseline is the whole batch rather than the group, so it works with
    one sample per prompt. The std is unbiased; a batch of a single reward
    gets 0.
    """
    r = as_float(rewards)  # [prompts, samples]
    if r.numel() < 2:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std(unbiased=True) + EPS)


def outcome_advantages(name: str, rewards: Tensor) -> Tensor:
    """Advantages of the outcome estimator `name`: rewards [prompts, samples] -> same shape."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {tuple(rewards.shape)}")
    return ADVANTAGES.get(name)(rewards)


# ── token-level estimators: (scores [batch], mask [batch, seq]) -> (adv, ret) ──


def _token_rewards(scores: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Per-token rewards [batch, seq]: the score at the last valid token, plus token_rewards."""
    rewards = place_at_last_token(scores, mask)  # [batch, seq]
    if token_rewards is not None:
        rewards = rewards + as_float(token_rewards)
    return rewards


@TOKEN_ADVANTAGES.register("reinforce_pp")
def reinforce_pp_tokens(
    scores: Tensor,  # [batch]
    mask: Tensor,  # [batch, seq]
    *,
    values: Tensor | None,
    token_rewards: Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ over tokens: discounted returns-to-go, whitened over the batch.

    reward[t] = token_rewards[t] (+ score at the last valid token),
    returns[t] = sum_{k >= t} gamma^(k-t) reward[k],
    advantages = returns whitened over all valid tokens of the batch.
    The whitening is token-weighted, so with gamma = 1 and no token rewards it
    differs from the outcome form (sequence-weighted) when lengths differ.
    """
    _refuse(values is not None, "reinforce_pp has no critic; values are only used by gae")
    _refuse(lam != 1.0, f"reinforce_pp does not use lam (got {lam}); only gae does")
    rewards = _token_rewards(scores, mask, token_rewards)  # [batch, seq]
    returns = discounted_cumsum_right(rewards, mask, gamma)  # [batch, seq]
    return masked_whiten(returns, mask, eps=EPS), returns


@TOKEN_ADVANTAGES.register("gae")
def gae(
    scores: Tensor,  # [batch]
    mask: Tensor,  # [batch, seq]
    *,
    values: Tensor | None,
    token_rewards: Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (PPO with a critic).

    reward[t] = token_rewards[t] (+ score at the last valid token),
    delta[t] = reward[t] + gamma * V[t+1] - V[t], with V = 0 after the last
    valid token (the episode ends there),
    A[t] = delta[t] + gamma * lam * A[t+1], computed backwards;
    returns = A + V (the critic's regression target, before whitening),
    advantages = A whitened over all valid tokens of the batch.
    """
    if values is None:
        raise ValueError("gae needs critic values [batch, seq]; got values=None")
    m = mask.bool()  # [batch, seq]
    v = torch.where(m, as_float(values), 0.0)  # [batch, seq]
    rewards = _token_rewards(scores, mask, token_rewards)  # [batch, seq]
    # V[t+1], and 0 beyond the last valid token (terminal state has no value).
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]
    deltas = torch.where(m, rewards + gamma * next_v - v, 0.0)  # [batch, seq]
    adv = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])  # [batch]
    for t in reversed(range(deltas.shape[1])):
        # Padded positions have delta 0 and sit after the valid prefix, so the
        # running sum is still 0 when the recursion enters a row's last token.
        running = deltas[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = torch.where(m, adv, 0.0)
    returns = torch.where(m, adv + v, 0.0)
    return masked_whiten(adv, mask, eps=EPS), returns


# ── the entry point used by the training loop ─────────────────────────────


def advantage_names() -> list[str]:
    """Every name `compute_advantages` accepts."""
    return sorted(set(ADVANTAGES.names()) | set(TOKEN_ADVANTAGES.names()))


@torch.no_grad()
def compute_advantages(
    name: str,
    scores: Tensor,  # [prompts, samples]
    mask: Tensor,  # [prompts * samples, seq]
    *,
    values: Tensor | None = None,  # [prompts * samples, seq]
    token_rewards: Tensor | None = None,  # [prompts * samples, seq]
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Token-level (advantages, returns), each [prompts * samples, seq], 0 on padding.

    `returns` is the quantity a critic would regress on: for outcome
    estimators the response's return R_i broadcast over its tokens; for
    reinforce_pp the discounted return-to-go; for gae A + V.
    """
    check_prefix_mask(mask)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [prompts, samples], got shape {tuple(scores.shape)}")
    batch = mask.shape[0]
    if scores.numel() != batch:
        raise ValueError(
            f"scores {tuple(scores.shape)} hold {scores.numel()} responses but mask has {batch} rows"
        )
    for what, t in (("values", values), ("token_rewards", token_rewards)):
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{what} must have the mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")

    if name in TOKEN_ADVANTAGES:
        estimator = TOKEN_ADVANTAGES.get(name)
        return estimator(
            scores.reshape(batch), mask, values=values, token_rewards=token_rewards, gamma=gamma, lam=lam
        )
    if name in ADVANTAGES:
        return _outcome_over_tokens(
            name, scores, mask, token_rewards=token_rewards, values=values, gamma=gamma, lam=lam
        )
    raise KeyError(f"unknown advantage estimator {name!r}; valid choices: {', '.join(advantage_names())}")


def _outcome_over_tokens(
    name: str,
    scores: Tensor,  # [prompts, samples]
    mask: Tensor,  # [batch, seq]
    *,
    token_rewards: Tensor | None,
    values: Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """An outcome estimator's advantage, the same on every valid token of a response."""
    _refuse(values is not None, f"{name} has no critic; values are only used by gae")
    _refuse(
        gamma != 1.0 or lam != 1.0,
        f"{name} treats a response as one action, so gamma and lam must be 1 (got gamma={gamma}, lam={lam}); "
        "use reinforce_pp or gae for discounting",
    )
    m = mask.bool()  # [batch, seq]
    returns = as_float(scores)  # [prompts, samples]
    if token_rewards is not None:
        # The KL-regularised return of the whole response (see module docstring).
        per_response = torch.where(m, as_float(token_rewards), 0.0).sum(dim=1)  # [batch]
        returns = returns + per_response.view_as(returns)
    adv = outcome_advantages(name, returns)  # [prompts, samples]
    # One value per response [batch, 1], repeated on its valid tokens.
    adv_tokens = torch.where(m, adv.reshape(-1, 1), 0.0)  # [batch, seq]
    return_tokens = torch.where(m, returns.reshape(-1, 1), 0.0)  # [batch, seq]
    return adv_tokens, return_tokens


def _refuse(condition: bool, message: str) -> None:
    """A knob the estimator would ignore is a configuration error, not a no-op."""
    if condition:
        raise ValueError(message)
