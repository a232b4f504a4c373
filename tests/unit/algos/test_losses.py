"""Losses, aggregation modes and logit helpers against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from ttrl.algos.losses import (
    AGG_MODES,
    aggregate,
    aggregation_normalizer,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    ppo_clip,
    self_certainty_from_logits,
    truncated_is_weight,
    value_loss,
)

ALL_MODES = ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ── aggregate ──────────────────────────────────────────────────────────────

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # 100 sits on padding
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_mean_by_hand():
    close(aggregate(LOSS, MASK, "token_mean"), (1 + 2 + 3 + 4 + 5) / 5)


def test_seq_mean_token_sum_by_hand():
    close(aggregate(LOSS, MASK, "seq_mean_token_sum"), ((1 + 2 + 3) + (4 + 5)) / 2)


def test_seq_mean_token_mean_by_hand():
    close(aggregate(LOSS, MASK, "seq_mean_token_mean"), ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_padding_values_are_ignored(mode):
    for pad in (0.0, -7.0, float("inf"), float("nan")):
        changed = LOSS.clone()
        changed[1, 2] = pad
        close(aggregate(changed, MASK, mode), aggregate(LOSS, MASK, mode))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_all_padding_gives_zero_not_nan(mode):
    close(aggregate(LOSS, torch.zeros_like(MASK), mode), 0.0)


def test_explicit_normalizer_replaces_the_count():
    close(aggregate(LOSS, MASK, "token_mean", normalizer=10), 15 / 10)
    close(aggregate(LOSS, MASK, "seq_mean_token_sum", normalizer=5), 15 / 5)


def test_normalizer_counts_tokens_or_responses():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is padding
    close(aggregation_normalizer(mask, "token_mean"), 4.0)
    close(aggregation_normalizer(mask, "seq_mean_token_sum"), 2.0)
    close(aggregation_normalizer(mask, "seq_mean_token_mean"), 2.0)


def test_unknown_mode_lists_choices():
    with pytest.raises(KeyError, match="valid choices: seq_mean_token_mean, seq_mean_token_sum, token_mean"):
        aggregate(LOSS, MASK, "sum")
    with pytest.raises(KeyError, match="valid choices"):
        aggregation_normalizer(MASK, "sum")
    assert AGG_MODES.names() == sorted(ALL_MODES)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        aggregate(LOSS, MASK[:, :2])


# ── gradient accumulation ──────────────────────────────────────────────────


def _ragged_batch():
    """4 responses of lengths 5, 1, 2, 4 and a parameter per token position."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])  # [4, 5]
    x = torch.randn(4, 5, generator=gen)
    w = torch.randn(5, generator=gen, requires_grad=True)
    return mask, x, w


def _loss_mat(x, w):
    return (x * w) ** 2  # [batch, seq], a per-token loss that depends on the parameter


@pytest.mark.parametrize("mode", ALL_MODES)
def test_micro_batches_with_global_normalizer_sum_to_the_full_batch(mode):
    mask, x, w = _ragged_batch()
    (full,) = torch.autograd.grad(aggregate(_loss_mat(x, w), mask, mode), w)

    normalizer = aggregation_normalizer(mask, mode)  # over the whole mini-batch
    accumulated = torch.zeros_like(w)
    # Uneven micro-batches: 1, 2 and 1 responses holding 5, 3 and 4 tokens.
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        micro = aggregate(_loss_mat(x[rows], w), mask[rows], mode, normalizer=normalizer)
        accumulated += torch.autograd.grad(micro, w)[0]
    close(accumulated, full, atol=1e-5)


def test_token_mean_with_local_counts_breaks_accumulation():
    # The trap `normalizer` exists for: averaging per-micro-batch token means
    # weighs the 5 tokens of the first micro-batch like the 7 of the second.
    mask, x, w = _ragged_batch()
    full = aggregate(_loss_mat(x, w), mask, "token_mean")
    averaged = (
        aggregate(_loss_mat(x[:1], w), mask[:1], "token_mean")
        + aggregate(_loss_mat(x[1:], w), mask[1:], "token_mean")
    ) / 2
    assert not torch.allclose(averaged, full)


def test_seq_mean_token_mean_with_local_counts_splits_evenly_sized_micro_batches():
    # Each response's mean is local to the response, so equal-sized micro-batches
    # averaged reproduce the full loss even without a normalizer.
    mask, x, w = _ragged_batch()
    full = aggregate(_loss_mat(x, w), mask, "seq_mean_token_mean")
    averaged = (
        aggregate(_loss_mat(x[:2], w), mask[:2], "seq_mean_token_mean")
        + aggregate(_loss_mat(x[2:], w), mask[2:], "seq_mean_token_mean")
    ) / 2
    close(averaged, full, atol=1e-6)


# ── ppo_clip ───────────────────────────────────────────────────────────────

# Tokens (old_logp = 0, so ratio = exp(logp)); row 0 = t0 t1 t2, row 1 = t3 t4 pad
#   t0: ratio 1.5, A=+1 -> max(-1.5, -1.2) = -1.2  clipped
#   t1: ratio 0.5, A=+1 -> max(-0.5, -0.8) = -0.5
#   t2: ratio 1.1, A=+2 -> max(-2.2, -2.2) = -2.2
#   t3: ratio 0.5, A=-1 -> max( 0.5,  0.8) =  0.8  clipped
#   t4: ratio 1.5, A=-1 -> max( 1.5,  1.2) =  1.5
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 3.0]])
ADV = torch.tensor([[1.0, 1.0, 2.0], [-1.0, -1.0, 5.0]])
PPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _logp(ratios=RATIOS):
    return ratios.log().clone().requires_grad_(True)


def test_ppo_clip_by_hand():
    logp = _logp()
    loss, stats = ppo_clip(logp, torch.zeros(2, 3), ADV, PPO_MASK, clip_low=0.2)
    close(loss, (-1.2 - 0.5 - 2.2 + 0.8 + 1.5) / 5)
    close(stats["clip_frac"], 2 / 5)
    close(stats["dual_clip_frac"], 0.0)
    approx_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.5, 1.5)) / 5
    close(stats["approx_kl"], approx_kl)
    assert not any(v.requires_grad for v in stats.values())

    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio, / 5 tokens; 0 where clipped and on padding.
    close(logp.grad, [[0.0, -1.0 * 0.5 / 5, -2.0 * 1.1 / 5], [0.0, 1.0 * 1.5 / 5, 0.0]])


def test_ppo_clip_higher():
    ratios = torch.tensor([[1.25, 1.5, 0.7]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    # clip range [0.8, 1.28]: 1.25 is inside, 1.5 clips to 1.28, 0.7 clips to 0.8
    loss, stats = ppo_clip(_logp(ratios), torch.zeros(1, 3), adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss, (-1.25 - 1.28 + 0.8) / 3)
    close(stats["clip_frac"], 2 / 3)
    # symmetric 0.2 would have clipped the first token too
    _, stats = ppo_clip(_logp(ratios), torch.zeros(1, 3), adv, mask, clip_low=0.2)
    close(stats["clip_frac"], 3 / 3)


def test_dual_clip_caps_negative_advantage_loss():
    ratios = torch.tensor([[5.0, 2.0, 5.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    logp = _logp(ratios)
    loss, stats = ppo_clip(logp, torch.zeros(1, 3), adv, mask, clip_low=0.2, dual_clip=3.0)
    # t0: max(5, 1.2) = 5 capped at 3; t1: max(2, 1.2) = 2 < 3; t2 (A > 0): max(-5, -1.2) = -1.2
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    close(stats["dual_clip_frac"], 1 / 3)
    close(stats["clip_frac"], 1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 1.0 * 2.0 / 3, 0.0]])
    # without dual clip the first token keeps its unbounded loss
    loss, _ = ppo_clip(_logp(ratios), torch.zeros(1, 3), adv, mask, clip_low=0.2)
    close(loss, (5.0 + 2.0 - 1.2) / 3)


def test_truncated_importance_weights():
    old = torch.zeros(1, 3)
    behavior = torch.tensor([[math.log(0.25), math.log(2.0), 0.0]])
    close(truncated_is_weight(old, behavior, cap=2.0), [[2.0, 0.5, 1.0]])
    close(truncated_is_weight(old, behavior, cap=None), [[4.0, 0.5, 1.0]])


def test_ppo_clip_with_behavior_logp_weights_each_token():
    ratios = torch.tensor([[1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    behavior = torch.tensor([[math.log(0.25), math.log(2.0), 0.0]])  # weights 2 (capped), 0.5, 1
    loss, stats = ppo_clip(
        _logp(ratios), torch.zeros(1, 3), adv, torch.ones(1, 3), behavior_logp=behavior, tis_cap=2.0
    )
    close(loss, (2.0 * -1.0 + 0.5 * 1.0 + 1.0 * -2.0) / 3)
    close(stats["tis_weight_mean"], (2.0 + 0.5 + 1.0) / 3)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_ppo_clip_ignores_padding(mode):
    old = torch.zeros(2, 3)
    a, _ = ppo_clip(_logp(), old, ADV, PPO_MASK, agg_mode=mode)
    ratios, adv = RATIOS.clone(), ADV.clone()
    ratios[1, 2], adv[1, 2] = 1e6, -1e6
    b, _ = ppo_clip(_logp(ratios), old, adv, PPO_MASK, agg_mode=mode)
    close(a, b)


def test_policy_loss_dispatch_and_errors():
    loss, _ = policy_loss("ppo_clip", _logp(), torch.zeros(2, 3), ADV, PPO_MASK, clip_low=0.2)
    close(loss, (-1.2 - 0.5 - 2.2 + 0.8 + 1.5) / 5)
    with pytest.raises(KeyError, match="valid choices: ppo_clip"):
        policy_loss("ppo", _logp(), torch.zeros(2, 3), ADV, PPO_MASK)
    with pytest.raises(ValueError, match="differs in shape"):
        policy_loss("ppo_clip", _logp(), torch.zeros(2, 2), ADV, PPO_MASK)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip(_logp(), torch.zeros(2, 3), ADV, PPO_MASK, dual_clip=1.0)
    with pytest.raises(ValueError, match="behavior_logp is None"):
        ppo_clip(_logp(), torch.zeros(2, 3), ADV, PPO_MASK, tis_cap=2.0)
    with pytest.raises(KeyError, match="valid choices"):
        ppo_clip(_logp(), torch.zeros(2, 3), ADV, PPO_MASK, agg_mode="mean")


# ── value loss ─────────────────────────────────────────────────────────────


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.9, 2.0]], requires_grad=True)
    old = torch.full((1, 3), 0.5)
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), clip_eps=0.2)
    # clipped values: 0.7, 0.7, 0.7
    # t0: max(1.0^2, 0.7^2) = 1; t1: max(0.1^2, 0.3^2) = 0.09 (clipped); t2: max(1, 0.3^2) = 1
    close(loss, 0.5 * (1.0 + 0.09 + 1.0) / 3)
    close(stats["vf_clip_frac"], 1 / 3)
    loss.backward()
    # d/dv 0.5 (v - R)^2 / 3 = (v - R) / 3; 0 where the clipped branch won
    close(values.grad, [[1.0 / 3, 0.0, 1.0 / 3]])


def test_unclipped_value_loss_and_padding():
    values = torch.tensor([[1.0, 3.0], [2.0, 99.0]])
    returns = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = value_loss(values, values, returns, mask, clip_eps=None)
    close(loss, 0.5 * (1.0 + 4.0 + 1.0) / 3)
    close(stats["vf_clip_frac"], 0.0)


# ── log-probs and entropy ──────────────────────────────────────────────────


def test_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]])  # [1, 2, 4]
    ids = torch.tensor([[1, 2]])
    z = math.exp(1) + math.exp(2) + math.exp(3) + 1.0
    close(logprobs_from_logits(logits, ids), [[-math.log(4), 3.0 - math.log(z)]], atol=1e-5)


def test_logprobs_bf16_are_upcast_and_differentiable():
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 5, 50, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 50, (3, 5), generator=gen)
    out = logprobs_from_logits(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    reference = torch.log_softmax(logits.detach().float(), dim=-1).gather(-1, ids[..., None])[..., 0]
    close(out.detach(), reference, atol=1e-5)
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]])
    z = math.exp(1) + math.exp(2) + math.exp(3) + 1.0
    p = [math.exp(v) / z for v in (1.0, 2.0, 3.0, 0.0)]
    close(entropy_from_logits(logits), [[math.log(4), -sum(q * math.log(q) for q in p)]], atol=1e-5)


def test_entropy_is_finite_for_extreme_logits_and_in_bf16():
    extreme = torch.tensor([[[1e4, -1e4, 0.0]]])
    h = entropy_from_logits(extreme)
    assert torch.isfinite(h).all()
    close(h, [[0.0]], atol=1e-6)
    logits = torch.randn(2, 3, 40).to(torch.bfloat16)
    p = torch.softmax(logits.float(), dim=-1)
    close(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5)


def test_self_certainty_by_hand():
    # Uniform: no certainty at all. [1, 2, 3, 0]: KL(U || p) = sum_v (1/4) log((1/4) / p_v).
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]])
    z = math.exp(1) + math.exp(2) + math.exp(3) + 1.0
    p = [math.exp(v) / z for v in (1.0, 2.0, 3.0, 0.0)]
    close(self_certainty_from_logits(logits), [[0.0, sum(0.25 * math.log(0.25 / q) for q in p)]], atol=1e-5)


def test_self_certainty_grows_with_confidence_and_holds_in_bf16():
    sharp = torch.tensor([[[8.0, 0.0, 0.0, 0.0]]])
    mild = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    assert float(self_certainty_from_logits(sharp)) > float(self_certainty_from_logits(mild)) > 0
    logits = torch.randn(2, 3, 40).to(torch.bfloat16)
    logp = torch.log_softmax(logits.float(), dim=-1)
    close(self_certainty_from_logits(logits), -math.log(40) - logp.mean(-1), atol=1e-5)
