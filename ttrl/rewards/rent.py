"""RENT: minus the policy's entropy over the last tokens of a response, where its answer is written.

RENT (Prabhudesai et al., 2025, arXiv 2505.22660, "Maximizing Confidence
Alone Improves Reasoning") rewards a response by the negative entropy of the
policy's next-token distributions, r = -mean_t H(p_t), with no answer read
at all. Its study of which tokens to measure found the confidence near the
end of the chain of thought, where the answer is committed to, the one
that tracks accuracy best; `token_entropy` already pays the mean over every
response token, so this reward measures the end:

    r_i = - (1/k) * sum over the last k response tokens of H(p_t),
    k = min(reward.rent.last_tokens, the response's length)

(null: every token, which is `token_entropy`). The default, 16 tokens, is on
the demo (one byte per token) the last step's result and the boxed answer,
"2=97 \\boxed{97}" and the end token, where a dropped carry is decided; on a
math model's response, the closing sentence that states the answer.

What we follow: the negative mean token entropy, from the policy's full
next-token distributions, trained with the run's GRPO-family estimator.
What we simplify: a fixed token count from the end stands in for the
paper's span choices (its "last chunk" is a share of the response, and it
found the answer tokens alone a weaker signal than that chunk; 16 tokens
keep the last step's result beside the boxed answer); the entropy is
the trainer's forward pass at the sampling temperature (the step's
token_stats with "entropies", one pass, as `token_entropy` gets its mean).
A sample with no response tokens gets its group's lowest reward, as for the
other intrinsic rewards, so an empty answer is never what is learned.

Label-free: it reads token entropies only, never an answer or
`prompt.answer`. Votes are left to the step (the plain majority, for the
metrics and the guard).
"""

from __future__ import annotations

import math

from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.rewards.intrinsic import _floor_missing
from ttrl.types import Prompt

__all__ = ["RentReward", "tail_entropy"]


def tail_entropy(entropies: list[float], last_tokens: int | None) -> float:
    """Mean entropy of the last `last_tokens` tokens (all when None or longer); NaN with no tokens."""
    tail = entropies if last_tokens is None else entropies[-last_tokens:]
    return math.fsum(tail) / len(tail) if tail else math.nan


@REWARDS.register("rent")
class RentReward(Reward):
    needs_ground_truth = False
    needs = frozenset({"token_stats", "token_entropies"})

    def __init__(self, last_tokens: int | None = 16):
        if last_tokens is not None and last_tokens < 1:
            raise ValueError(f"reward.rent.last_tokens={last_tokens} must be at least 1 (or null: every token)")
        self.last_tokens = last_tokens

    def __call__(self, prompts: list[Prompt], completions: list[list[str]], answers: list[list[str | None]],
                 token_stats: list[list[dict]] | None = None) -> RewardOutput:
        if token_stats is None:
            raise ValueError("rent needs token_stats with each token's entropy (the step computes them)")
        rows = [[-tail_entropy(list(s["entropies"]), self.last_tokens) for s in group] for group in token_stats]
        return RewardOutput(rewards=_floor_missing(rows))
