"""The RL maths of ttrl: advantage estimators, policy/value losses, KL estimators.

Pure torch functions, registered by name so that configs can pick them
(`algorithm.advantage=grpo`, `algorithm.policy_loss=ppo_clip`, `algorithm.kl_estimator=k3`).
This package must never import ray, vllm or deepspeed, never touch a model or
an optimiser, and never see ground-truth answers: tensors in, tensors out.
"""

from ttrl.algos.advantages import (
    ADVANTAGES,
    TOKEN_ADVANTAGES,
    advantage_names,
    compute_advantages,
    outcome_advantages,
)
from ttrl.algos.kl import KL_ESTIMATORS, kl, kl_penalty
from ttrl.algos.losses import (
    AGG_MODES,
    POLICY_LOSSES,
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
from ttrl.algos.utils import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "TOKEN_ADVANTAGES",
    "advantage_names",
    "aggregate",
    "aggregation_normalizer",
    "compute_advantages",
    "entropy_from_logits",
    "kl",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "outcome_advantages",
    "policy_loss",
    "ppo_clip",
    "self_certainty_from_logits",
    "truncated_is_weight",
    "value_loss",
]
