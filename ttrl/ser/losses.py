"""Reward-model losses and accuracies: pure torch, hand-checkable.

- `bradley_terry_loss`: the pairwise loss -log sigmoid(r_chosen - r_rejected)
  (Bradley-Terry: P(chosen > rejected) = sigmoid(r_chosen - r_rejected)),
  optionally with a centering term that pins the scores' offset.
- `pointwise_loss`: binary cross-entropy of sigmoid(score) against a 0/1
  label (is this response correct?), for the pointwise SER variant.

Both return the *sum* over rows divided by `normalizer` (the number of rows
in the whole optimizer step, over every micro-batch and rank), so that
micro-batches and ranks add up to the mean over the global batch; with no
normalizer they return the plain mean. Nothing here imports ray, vllm or
deepspeed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["bradley_terry_loss", "pairwise_accuracy", "pointwise_accuracy", "pointwise_loss"]


def _reduce(per_row: Tensor, normalizer: float | None) -> Tensor:
    if normalizer is None:
        return per_row.mean()
    return per_row.sum() / normalizer


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, normalizer: float | None = None,
                       center_coef: float = 0.0) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair, summed and divided by `normalizer` (or averaged).

    r_chosen, r_rejected: [b] scalar scores of the two responses of each pair.
    `center_coef` adds center_coef * (r_chosen + r_rejected)^2 per pair
    (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`): the
    Bradley-Terry loss sees only differences, so without it the scores
    drift by an arbitrary constant, and sigmoid(score), which SER's filter
    thresholds, would mean nothing. With it a pair's scores sit around 0.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"chosen scores {tuple(r_chosen.shape)} and rejected {tuple(r_rejected.shape)} differ")
    r_c, r_r = r_chosen.float(), r_rejected.float()
    per_pair = -F.logsigmoid(r_c - r_r)
    if center_coef:
        per_pair = per_pair + center_coef * (r_c + r_r) ** 2
    return _reduce(per_pair, normalizer)


def pointwise_loss(scores: Tensor, labels: Tensor, normalizer: float | None = None) -> Tensor:
    """Binary cross-entropy of sigmoid(scores) against labels in {0, 1}: [b] -> scalar."""
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    per_row = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")
    return _reduce(per_row, normalizer)


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher (a tie counts as wrong)."""
    if r_chosen.numel() == 0:
        return float("nan")
    return float((r_chosen > r_rejected).float().mean())


def pointwise_accuracy(scores: Tensor, labels: Tensor) -> float:
    """Share of responses on the right side of sigmoid(score) = 0.5, i.e. score = 0."""
    if scores.numel() == 0:
        return float("nan")
    return float(((scores > 0).float() == labels.float()).float().mean())
