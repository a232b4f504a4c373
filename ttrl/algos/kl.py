"""Per-token estimators of KL(policy || reference) from sampled tokens' log-probs.

The tokens were sampled from the policy, so with log_ratio = logp - ref_logp
(one number per token) Schulman's estimators of KL(pi || pi_ref) are:

- k1 = log_ratio: unbiased, but half its values are negative (high variance);
- k2 = 0.5 * log_ratio^2: always >= 0, biased as a value, low variance;
- k3 = exp(-log_ratio) + log_ratio - 1 (alias `low_var_kl`): unbiased and
  always >= 0, the usual choice for a KL *loss* (GRPO).

As a loss differentiated through logp only (samples held fixed, the usual
case), the expected gradients differ from the values: k1 gives 0, k2 gives
the gradient of KL(pi || pi_ref), k3 that of the forward KL(pi_ref || pi).
Both k2 and k3 pull the policy towards the reference; pick knowingly.

Each returns [batch, seq] and keeps the autograd graph, so one estimate serves
both uses:
- as a loss term: `aggregate(kl(name, logp, ref_logp), mask, mode)` (losses.py);
- as a reward penalty: `kl_penalty(...)`, i.e. -coef * kl.detach() per token,
  passed to `compute_advantages(token_rewards=...)`.

This module must never import ray, vllm or deepspeed, and never reduces over
tokens itself (masking and aggregation belong to the caller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ttrl.registry import Registry

KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

# k3 exponentiates the log-ratio; on tokens where policy and reference have
# drifted far apart exp() would overflow (inf, then nan gradients). The log
# ratio is clamped before exp and the result to [-10, 10] afterwards.
K3_LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp, [batch, seq]."""
    return logp.float() - ref_logp.float()


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2, [batch, seq]."""
    return 0.5 * (logp.float() - ref_logp.float()) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10], [batch, seq].

    (It is >= 0 mathematically; the lower clamp only documents the range.)
    """
    log_ratio = (ref_logp.float() - logp.float()).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


KL_ESTIMATORS.register("low_var_kl")(k3)


def kl(name: str, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The KL estimate `name` per token: logp, ref_logp [batch, seq] -> [batch, seq]."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return KL_ESTIMATORS.get(name)(logp, ref_logp)


def kl_penalty(name: str, logp: Tensor, ref_logp: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Token rewards -coef * kl [batch, seq] for KL-in-reward; 0 on padding.

    Detached: a reward is a fixed target for the policy gradient, and
    differentiating through it would turn the penalty into a second,
    unintended loss term.
    """
    penalty = -coef * kl(name, logp, ref_logp).detach()  # [batch, seq]
    return torch.where(mask.bool(), penalty, 0.0)
