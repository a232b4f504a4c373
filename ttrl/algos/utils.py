"""Masked reductions over padded token tensors, shared by advantages and losses.

Responses in a batch have different lengths, so every per-token tensor comes
with a 0/1 `mask` of the same shape (1 = a real response token, 0 = padding).
These helpers reduce over the real tokens only, and they select with
`torch.where` rather than multiplying by the mask, so that whatever sits in a
padded slot (garbage, inf, nan) can never leak into a result.

This module must never import ray, vllm or deepspeed, and must never hold
state: every function is pure.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """x itself when it is floating point, else x as float32 (0/1 int rewards)."""
    return x if x.is_floating_point() else x.to(torch.float32)


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, 0 elsewhere (no nan * 0 = nan leaks from padding)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over the positions where mask is 1 (all of them, or along `dim`)."""
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of valid positions, as a float tensor (for use as a divisor)."""
    m = mask.bool().to(torch.float32)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over valid positions; 0 where there is no valid position.

    An all-padding row (an empty response) has no mean; returning 0 instead of
    nan keeps one empty response from poisoning a whole batch's statistics.
    """
    count = masked_count(mask, dim).to(x.dtype)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all valid positions (a scalar); 0 when it is undefined.

    With `unbiased` the divisor is n - 1 (Bessel's correction), as torch.std
    does by default. When the divisor would be 0 (a single valid value, or
    none) the result is 0, so a degenerate batch whitens to 0 rather than nan.
    """
    n = masked_count(mask).to(x.dtype)
    mean = masked_mean(x, mask)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    divisor = n - 1 if unbiased else n
    if divisor <= 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return sq_dev / divisor


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-6, shift_mean: bool = True) -> Tensor:
    """(x - mean) / (std + eps) with statistics over valid positions only.

    The std is unbiased, like GRPO's group std, so all estimators share one
    convention. Padded positions come back as exactly 0.
    """
    mean = masked_mean(x, mask)
    std = masked_var(x, mask, unbiased=True).sqrt()
    centred = x - mean if shift_mean else x
    return _select(centred / (std + eps), mask)


def check_prefix_mask(mask: Tensor) -> None:
    """Raise unless every row of mask [batch, seq] is ones followed by zeros.

    Responses are left-aligned (prompt tokens are not part of the response
    tensor), so the valid tokens of a row are a prefix. The backward
    recursions (returns, GAE) and "the last valid token" rely on this; a mask
    with holes would silently cut a return in two, so it is refused.
    """
    if mask.dim() != 2:
        raise ValueError(f"response mask must be [batch, seq], got shape {tuple(mask.shape)}")
    m = mask.bool()
    # A prefix of ones never goes 0 -> 1 along the sequence.
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("response mask rows must be a prefix of ones (e.g. 1,1,1,0,0); found a hole")


def last_token_onehot(mask: Tensor) -> Tensor:
    """[batch, seq] bool, True at the last valid token of each non-empty row."""
    m = mask.bool()  # [batch, seq]
    # Position t is last when it is valid and t + 1 is not (or t is the end).
    next_valid = torch.zeros_like(m)
    next_valid[:, :-1] = m[:, 1:]
    return m & ~next_valid


def place_at_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """Scatter one score per row [batch] onto its last valid token -> [batch, seq].

    This is how an outcome reward (one number per response) becomes a
    per-token reward sequence: it is earned by the final action. A row with
    no valid token gets nothing (its score is dropped, not misplaced).
    """
    last = last_token_onehot(mask)  # [batch, seq]
    s = as_float(scores).unsqueeze(-1)  # [batch, 1]
    return torch.where(last, s, torch.zeros((), dtype=s.dtype, device=s.device))


def discounted_cumsum_right(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G[t] = sum_{k >= t} gamma^(k-t) * rewards[k] over valid tokens -> [batch, seq].

    Computed by a backward loop over the sequence: it reads like the formula
    and costs one small op per position, which is negligible next to a
    forward pass. Padded positions neither contribute nor receive a return.
    """
    r = _select(rewards, mask)  # [batch, seq]
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [batch]
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    return _select(returns, mask)
