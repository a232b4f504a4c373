"""Intrinsic rewards: how sure the policy is of its own response, with no answer read at all.

Three members of the entropy-minimisation family, each a number per sample
computed from the policy's token distributions:

- `token_entropy` (EM-RL's token-level reward, Agarwal et al., 2025, arXiv
  2505.15134; RENT, Prabhudesai et al., 2025, arXiv 2505.22660): minus the
  mean over the response's tokens of the entropy of the policy's next-token
  distribution. Confident responses score higher.
- `self_certainty` (Intuitor, Zhao et al., 2025, arXiv 2505.19590): the mean
  over the response's tokens of KL(uniform || p), the distance of each
  next-token distribution from uniform. Entropy, -sum p log p, hardly feels
  the unlikely tokens; KL(U || p) = -log V - mean_v log p_v averages log p
  over the whole vocabulary, so it pays for pushing every unlikely token
  further down, and Intuitor found it less drawn to long responses.
- `trajectory_logprob` (EM-RL's sequence-level reward): the sum of the
  sampled tokens' log-probs, log pi(response | prompt), an estimate of minus
  the trajectory's entropy; `per_token=true` divides by the length.

Where the numbers come from, and why. `trajectory_logprob` reads the
log-probs the rollout engine returned with each sampled token: free, and
they are the sampling policy's. The other two need each token's whole
distribution, which the engines do not return (only the sampled token's
log-prob, or a top-k that would bias the entropy), so the step asks the
trainer for one forward pass over the samples (`StepRuntime.token_stats`),
reducing each micro-batch's [rows, tokens, vocab] logits to two numbers per
token as the log-prob pass does: no extra memory over that pass, one
forward pass of time (`make bench` measures it).

A sample with no response tokens has no entropy or certainty to measure and
an empty sum of log-probs (0, the best possible score): it gets its group's
lowest reward, so an empty answer is never the thing learned. All three are
label-free and read neither answers nor `prompt.answer`.
"""

from __future__ import annotations

import math

from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SelfCertaintyReward", "TokenEntropyReward", "TrajectoryLogprobReward"]


def _floor_missing(rows: list[list[float]]) -> list[list[float]]:
    """Replace NaN (a sample with nothing to measure) by its group's lowest score; 0 if none was measured."""
    out = []
    for row in rows:
        measured = [v for v in row if not math.isnan(v)]
        low = min(measured) if measured else 0.0
        out.append([low if math.isnan(v) else v for v in row])
    return out


class _TokenStatReward(Reward):
    needs_ground_truth = False
    needs = frozenset({"token_stats"})
    key = ""
    sign = 1.0

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 token_stats: list[list[dict[str, float]]] | None = None) -> RewardOutput:
        if token_stats is None:
            raise ValueError(f"{type(self).__name__} needs token_stats (the step computes them)")
        rows = [[self.sign * float(s[self.key]) for s in group] for group in token_stats]
        return RewardOutput(rewards=_floor_missing(rows))


@REWARDS.register("token_entropy")
class TokenEntropyReward(_TokenStatReward):
    """Minus the response's mean token entropy (nats), from the trainer's forward pass."""

    key, sign = "entropy", -1.0


@REWARDS.register("self_certainty")
class SelfCertaintyReward(_TokenStatReward):
    """The response's mean KL(uniform || p) per token (nats), from the trainer's forward pass."""

    key, sign = "self_certainty", 1.0


@REWARDS.register("trajectory_logprob")
class TrajectoryLogprobReward(Reward):
    """log pi(response | prompt) from the engine's sampled-token log-probs; the mean per token with per_token."""

    needs_ground_truth = False
    needs = frozenset({"logprobs"})

    def __init__(self, per_token: bool = False):
        self.per_token = per_token

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 logprobs: list[list[list[float]]] | None = None) -> RewardOutput:
        if logprobs is None:
            raise ValueError("TrajectoryLogprobReward needs the engine's log-probs")
        rows = []
        for group in logprobs:
            row = []
            for lp in group:
                if not lp:
                    row.append(math.nan)
                else:
                    total = math.fsum(lp)
                    row.append(total / len(lp) if self.per_token else total)
            rows.append(row)
        return RewardOutput(rewards=_floor_missing(rows))
