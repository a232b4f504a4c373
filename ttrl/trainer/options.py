"""How the trainer ranks turn a batch into an update: `UpdateOptions`.

One frozen value, built once from the config (`UpdateOptions.from_config`),
handed with every batch to the DeepSpeed workers (it crosses to them by
pickle, so it holds plain numbers and names only). What changes from one
step to the next (fault injection) is an argument of the call, never a
field set on a shared object. Must never import torch, ray, vllm or
deepspeed: the driver, the workers and the unit tests all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class UpdateOptions:
    """The loss and its terms: loss = pg_loss + kl_coef * kl_loss - entropy_coef * entropy."""

    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    # The KL is then a per-token reward penalty (the step's business), not a loss term.
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    # Passes over each step's batch; one optimizer step per mini-batch per pass.
    ppo_epochs: int = 1
    value_clip: float = 0.2
    # The rollout's sampling temperature: the trainer's log-probs must score what was sampled.
    temperature: float = 1.0
    # Samples of an older policy (overlap mode) are reweighted by
    # min(pi_old / pi_behaviour, tis_cap); None: the samples are on-policy.
    tis_cap: float | None = None
    # trainer.skip_zero_advantage: rows with zero advantage skip the backward when that changes nothing.
    skip_zero_advantage: bool = True

    @property
    def skips_zero_advantage(self) -> bool:
        """Whether rows of zero advantage may skip the backward: their policy-loss term is -A * ratio = 0 (clipped,
        dual-clipped or IS-weighted alike), so only an entropy bonus or a KL loss term would give them a gradient."""
        return self.skip_zero_advantage and self.entropy_coef == 0 and (self.kl_coef == 0 or self.kl_in_reward)

    @classmethod
    def from_config(cls, cfg: Any, overlap: bool | None = None) -> UpdateOptions:
        """The options `cfg` asks for; `overlap` (default: rollout.overlap) switches the IS correction on."""
        a, r = cfg.algorithm, cfg.rollout
        overlap = r.overlap if overlap is None else overlap
        return cls(policy_loss=a.policy_loss, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
                   loss_agg=a.loss_agg, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                   kl_in_reward=a.kl_in_reward, entropy_coef=a.entropy_coef, ppo_epochs=a.ppo_epochs,
                   value_clip=a.value_clip, temperature=r.temperature, tis_cap=r.tis_cap if overlap else None,
                   skip_zero_advantage=cfg.trainer.skip_zero_advantage)
