"""Policy and value losses, their token aggregation, and log-prob/entropy helpers.

- `aggregate(loss_mat, mask, mode, normalizer=None)`: a [batch, seq] loss
  matrix to a scalar, by a registered mode (`AGG_MODES`).
- `POLICY_LOSSES` (`ppo_clip`) and `policy_loss(name, ...)`: the clipped
  surrogate, with DAPO's clip-higher, dual-clip, and a truncated
  importance-sampling correction for rollouts whose log-probs differ from
  the trainer's.
- `value_loss`: PPO's clipped critic loss.
- `logprobs_from_logits`, `entropy_from_logits`: float32, memory-aware.

Gradient accumulation. A mini-batch is often split into micro-batches whose
gradients are summed. Each mode divides by a count; computed per micro-batch
that count differs from the full batch's, and the summed gradients no longer
equal the full-batch gradient (the classic case: `token_mean` with
micro-batches of different token counts). Pass `normalizer` = the count of
the *whole* mini-batch (across data-parallel ranks too), as returned by
`aggregation_normalizer(full_mask, mode)`, and then, for every mode, the
micro-batch losses sum exactly to the full-batch loss:
- `token_mean`: normalizer = number of valid tokens;
- `seq_mean_token_sum`, `seq_mean_token_mean`: normalizer = number of
  non-empty responses (a response's own sum/mean never crosses a split).
Without `normalizer` each micro-batch uses its own count (fine when there is
a single micro-batch).

This module must never import ray, vllm or deepspeed; it computes losses and
never steps an optimiser or reduces across processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ttrl.algos.utils import masked_count, masked_mean, masked_sum
from ttrl.registry import Registry

# ── aggregation: [batch, seq] -> scalar ─────────────────────────────────────

# A global count to divide by instead of the micro-batch's own (see above).
Normalizer = float | Tensor | None
AggMode = Callable[[Tensor, Tensor, Normalizer], Tensor]
AGG_MODES: Registry[AggMode] = Registry("loss aggregation mode")


def _divide(total: Tensor, local_count: Tensor, normalizer: Normalizer) -> Tensor:
    """total / normalizer, or / the local count (at least 1, so empty batches give 0)."""
    denom = local_count.clamp(min=1) if normalizer is None else normalizer
    return total / denom


@AGG_MODES.register("token_mean")
def token_mean(loss_mat: Tensor, mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """Sum over all valid tokens / number of valid tokens: every token weighs the same.

    Long responses weigh more than short ones (DAPO's choice).
    """
    return _divide(masked_sum(loss_mat, mask), masked_count(mask), normalizer)


def _num_responses(mask: Tensor) -> Tensor:
    """Number of rows with at least one valid token (padding rows do not count)."""
    return mask.bool().any(dim=-1).to(torch.float32).sum()


@AGG_MODES.register("seq_mean_token_sum")
def seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """Per-response sum over tokens, then mean over responses.

    No length normalisation inside a response (Dr. GRPO's choice); the scale
    grows with response length.
    """
    per_seq = masked_sum(loss_mat, mask, dim=-1)  # [batch]
    return _divide(per_seq.sum(), _num_responses(mask), normalizer)


@AGG_MODES.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """Per-response mean over tokens, then mean over responses (the original GRPO).

    Every response weighs the same whatever its length.
    """
    per_seq = masked_mean(loss_mat, mask, dim=-1)  # [batch]
    return _divide(per_seq.sum(), _num_responses(mask), normalizer)


def aggregate(
    loss_mat: Tensor,  # [batch, seq]
    mask: Tensor,  # [batch, seq]
    mode: str = "token_mean",
    normalizer: Normalizer = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar with the aggregation `mode` (see AGG_MODES).

    `normalizer` replaces the mode's own count (tokens, or responses) by a
    global one, so that micro-batch losses add up to the full-batch loss.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ in shape")
    return AGG_MODES.get(mode)(loss_mat, mask, normalizer)


def aggregation_normalizer(mask: Tensor, mode: str) -> Tensor:
    """The count `mode` divides by, for the full mini-batch `mask` [batch, seq].

    Compute it once on the whole mini-batch (sum it across data-parallel
    ranks) and pass it as `normalizer` to every micro-batch's loss.
    """
    AGG_MODES.get(mode)  # an unknown mode fails here with the list of choices
    return masked_count(mask) if mode == "token_mean" else _num_responses(mask)


# ── policy losses ──────────────────────────────────────────────────────────


class PolicyLoss(Protocol):
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        **kwargs,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")

# exp() of a log-ratio beyond this would overflow in float32; such tokens are
# clipped anyway (ratio far outside 1 ± eps), so clamping changes no gradient
# of an unclipped token.
LOG_RATIO_CLAMP = 20.0


def truncated_is_weight(old_logp: Tensor, behavior_logp: Tensor, cap: float | None) -> Tensor:
    """min(pi_old / pi_behavior, cap) per token [batch, seq], detached.

    The rollout engine (vLLM) samples with its own numerics, or with stale
    weights when generation overlaps training, so its log-probs
    `behavior_logp` can differ from the trainer's `old_logp`. Re-weighting
    each token by pi_old / pi_behavior corrects the sampling mismatch; the cap
    (truncated IS) bounds the variance that rare large ratios would add.
    """
    log_w = (old_logp.float() - behavior_logp.float()).clamp(max=LOG_RATIO_CLAMP)
    w = log_w.exp()
    if cap is not None:
        w = w.clamp(max=cap)
    return w.detach()


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,  # [batch, seq] current policy, with grad
    old_logp: Tensor,  # [batch, seq] policy that produced the advantages' data
    advantages: Tensor,  # [batch, seq]
    mask: Tensor,  # [batch, seq]
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg_mode: str = "token_mean",
    normalizer: Normalizer = None,
    behavior_logp: Tensor | None = None,  # [batch, seq] the rollout engine's log-probs
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate loss, with clip-higher, dual-clip and truncated IS.

    ratio = exp(logp - old_logp); per token
        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)).
    `clip_high` defaults to `clip_low`; a larger one (DAPO's clip-higher, e.g.
    0.28) leaves low-probability tokens more room to grow, against entropy
    collapse.
    Dual clip (Ye et al., 2020), c = `dual_clip` > 1: for A < 0 the loss is
    additionally capped at -c * A, i.e. loss = min(loss, -c * A), so that a
    token whose ratio has grown very large cannot produce an unbounded loss.
    With `behavior_logp`, each token's loss is multiplied by
    `truncated_is_weight(old_logp, behavior_logp, tis_cap)`.

    Stats (detached 0-dim tensors, means over valid tokens):
    - clip_frac: share of tokens where the ratio clip is active (their
      gradient is 0);
    - dual_clip_frac: share of tokens where the dual-clip cap is active
      (gradient 0 too);
    - approx_kl: k3 estimate of KL(pi_old || pi), (ratio - 1) - log ratio,
      which is unbiased and >= 0 for tokens sampled from pi_old;
    - tis_weight_mean: mean IS weight, only when `behavior_logp` is given.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if clip_low <= 0 or clip_high <= 0:
        raise ValueError(f"clip_low and clip_high must be > 0, got {clip_low} and {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -c * A), got {dual_clip}")
    if tis_cap is not None and behavior_logp is None:
        raise ValueError(
            "tis_cap is set but behavior_logp is None: the IS weight needs the rollout log-probs"
        )

    log_ratio = (logp.float() - old_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [batch, seq]
    ratio = log_ratio.exp()
    adv = advantages.float()
    surrogate = -adv * ratio  # [batch, seq]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(surrogate, clipped)
    # The clip is active where the clipped term is strictly the larger one.
    is_clipped = clipped > surrogate

    is_dual_clipped = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip  # [batch, seq], > 0 where A < 0
        is_dual_clipped = (adv < 0) & (cap < loss_mat)
        loss_mat = torch.where(is_dual_clipped, cap, loss_mat)

    stats: dict[str, Tensor] = {}
    if behavior_logp is not None:
        weight = truncated_is_weight(old_logp, behavior_logp, tis_cap)  # [batch, seq]
        loss_mat = loss_mat * weight
        stats["tis_weight_mean"] = masked_mean(weight, mask)

    loss = aggregate(loss_mat, mask, agg_mode, normalizer)
    with torch.no_grad():
        stats["clip_frac"] = masked_mean(is_clipped.float(), mask)
        stats["dual_clip_frac"] = masked_mean(is_dual_clipped.float(), mask)
        stats["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, mask)
    return loss, stats


def policy_loss(
    name: str,
    logp: Tensor,  # [batch, seq]
    old_logp: Tensor,  # [batch, seq]
    advantages: Tensor,  # [batch, seq]
    mask: Tensor,  # [batch, seq]
    **kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The registered policy loss `name`; kwargs are its hyper-parameters."""
    for what, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{what} {tuple(t.shape)} differs in shape from logp {tuple(logp.shape)}")
    return POLICY_LOSSES.get(name)(logp, old_logp, advantages, mask, **kwargs)


# ── value loss ─────────────────────────────────────────────────────────────


def value_loss(
    values: Tensor,  # [batch, seq] current critic, with grad
    old_values: Tensor,  # [batch, seq] critic at rollout time
    returns: Tensor,  # [batch, seq] targets
    mask: Tensor,  # [batch, seq]
    *,
    clip_eps: float | None = 0.2,
    agg_mode: str = "token_mean",
    normalizer: Normalizer = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped critic loss: 0.5 * max((v - R)^2, (clip(v, v_old ± eps) - R)^2).

    Clipping keeps one update from moving a value estimate far from the one
    the advantages were computed with; taking the max makes it pessimistic
    (it never rewards the clip). `clip_eps=None` gives the plain 0.5 * (v - R)^2.
    Stats: vf_clip_frac (share of tokens where the clipped term is the larger).
    """
    v = values.float()
    r = returns.float()
    unclipped = (v - r) ** 2  # [batch, seq]
    if clip_eps is None:
        loss_mat = 0.5 * unclipped
        is_clipped = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        old = old_values.float()
        v_clipped = torch.clamp(v, old - clip_eps, old + clip_eps)
        clipped = (v_clipped - r) ** 2
        loss_mat = 0.5 * torch.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
    loss = aggregate(loss_mat, mask, agg_mode, normalizer)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean(is_clipped.float(), mask)}
    return loss, stats


# ── log-probs and entropy from logits ──────────────────────────────────────


def _rowwise_float32(fn: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """Apply fn to logits in float32, one batch row at a time when they are 16-bit.

    Upcasting a whole bf16 [batch, seq, vocab] tensor would double its memory
    (vocab ~150k); one [seq, vocab] row at a time keeps the extra to one row.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return fn(logits)
    return torch.stack([fn(row.float()) for row in logits])


def logprobs_from_logits(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[token] per position: logits [batch, seq, vocab], token_ids [batch, seq] -> [batch, seq].

    Computed as logit[token] - logsumexp(logits), which never materialises the
    full [batch, seq, vocab] log-softmax; float32 for the subtraction's sake.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match token_ids {tuple(token_ids.shape)}")

    def one(x: Tensor, ids: Tensor) -> Tensor:
        chosen = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [..., seq]
        return chosen - torch.logsumexp(x, dim=-1)

    if logits.dtype in (torch.float32, torch.float64):
        return one(logits, token_ids)
    return torch.stack([one(row.float(), ids) for row, ids in zip(logits, token_ids, strict=True)])


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: [batch, seq, vocab] -> [batch, seq].

    H = logsumexp(z) - sum softmax(z) * z, which stays finite for any logits
    (no log of a probability that underflowed to 0).
    """

    def one(z: Tensor) -> Tensor:
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)

    return _rowwise_float32(one, logits)


def self_certainty_from_logits(logits: Tensor) -> Tensor:
    """KL(uniform || softmax(logits)) per position: [batch, seq, vocab] -> [batch, seq].

    Intuitor's self-certainty (Zhao et al., 2025, arXiv 2505.19590): how far the
    next-token distribution sits from uniform, 0 for a uniform one, growing as
    the model grows sure. With log p_v = z_v - logsumexp(z),
    KL(U || p) = -log V - mean_v log p_v = logsumexp(z) - mean_v z_v - log V,
    so no log-softmax over the vocabulary is materialised.
    """

    def one(z: Tensor) -> Tensor:
        return torch.logsumexp(z, dim=-1) - z.mean(dim=-1) - math.log(z.shape[-1])

    return _rowwise_float32(one, logits)
