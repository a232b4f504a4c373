"""What a reward is, the registry of rewards, and the one way the loop calls one.

A reward is a `Reward`: a `needs_ground_truth` flag, a call
`reward(prompts, completions, answers) -> RewardOutput` where completions and
answers are [prompt][sample] lists (answers already extracted), and `close()`
(a no-op unless the reward holds something, like a reward model's actor),
which the run calls once at its end. Rewards are registered by name in
`REWARDS` and built from config with `build_reward`.

`compute_rewards` is the only entry point the training loop uses. It hands a
reward `Prompt.scrubbed()` copies (answer None) unless the reward declares
`needs_ground_truth`: in a label-free run the ground truth cannot reach a
reward even by accident. Nothing here imports torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from ttrl.labeling.vote import Vote
from ttrl.registry import Registry
from ttrl.types import Group, Prompt

__all__ = ["REWARDS", "Reward", "RewardError", "RewardOutput", "build_reward", "compute_rewards"]


class RewardError(ValueError):
    """A reward failed on a step's samples (a user's function raised, or returned the wrong number or kind
    of values): the step is skipped with this message, never scored as zeros."""


@dataclass
class RewardOutput:
    """Rewards of one step's samples, and what the reward learned on the way."""

    rewards: list[list[float]]  # [prompts][samples]
    # One majority vote per prompt, when the reward computed them (metrics reuse them).
    votes: list[Vote] | None = None
    # How many rewards a user function returned as None (they became 0.0).
    none_count: int = 0


class Reward:
    """What every registered reward is (they subclass it)."""

    # True only for rewards that grade against the ground truth (oracles).
    needs_ground_truth: bool = False
    # Per-sample inputs beyond text and answer, each handed as a keyword of
    # the call, [prompts][samples] like the rest: "logprobs", the engine's
    # log-prob of each sampled token (free: the rollout returns them);
    # "token_stats", {"entropy", "self_certainty"} of the policy's next-token
    # distribution averaged over the sample's response tokens (and "tokens",
    # their number), which the step
    # asks the trainer for (one forward pass) only when a reward needs them;
    # "token_entropies" (with "token_stats"), each sample's per-token entropies
    # as well, under the key "entropies" (a list as long as the response);
    # "views", the answers of the samples of each prompt's second view
    # (`view_answers`), which the step samples beside the prompt's own.
    needs: frozenset[str] = frozenset()

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],  # [prompts][samples]
        answers: list[list[str | None]],  # [prompts][samples]
    ) -> RewardOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the reward holds; called once, when the run ends."""


REWARDS: Registry[type] = Registry("reward")


def build_reward(name: str, extractor: str | None = None, **options: Any) -> Reward:
    """Build the reward registered as `name` from its config options.

    `extractor` (the run's label.extractor) goes only to rewards whose
    constructor takes an `extractor` parameter: those that compare answers.
    """
    cls = REWARDS.get(name)
    if extractor is not None and "extractor" in inspect.signature(cls).parameters:
        options["extractor"] = extractor
    # Checked here so that a wrong option gets one sentence naming the reward,
    # not a TypeError from deep inside a constructor.
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ValueError(f"reward {name!r} does not accept options {sorted(options)}: {err}") from None
    return cls(**options)


def compute_rewards(reward: Reward, groups: list[Group],
                    token_stats: list[list[dict[str, Any]]] | None = None) -> RewardOutput:
    """Reward every sample of every group; the loop's only way to call a reward.

    `token_stats` ([prompts][samples]) must be given when the reward `needs` them.
    """
    needs_truth = bool(getattr(reward, "needs_ground_truth", False))
    prompts = [g.prompt if needs_truth else g.prompt.scrubbed() for g in groups]
    completions = [[s.text for s in g.samples] for g in groups]
    answers = [[s.answer for s in g.samples] for g in groups]
    needs = getattr(reward, "needs", frozenset())
    extras: dict[str, Any] = {}
    if "logprobs" in needs:
        extras["logprobs"] = [[list(s.logprobs) for s in g.samples] for g in groups]
    if "views" in needs:
        if any(g.view_samples is None for g in groups):
            raise ValueError(f"reward {type(reward).__name__} needs the second view's samples of every prompt")
        extras["view_answers"] = [[s.answer for s in g.view_samples] for g in groups]
    if "token_stats" in needs:
        if token_stats is None:
            raise ValueError(f"reward {type(reward).__name__} needs token_stats and none were computed")
        if "token_entropies" in needs and any("entropies" not in s for row in token_stats for s in row):
            raise ValueError(f"reward {type(reward).__name__} needs each token's entropy and the token_stats "
                             f"hold only the means")
        extras["token_stats"] = token_stats
    out = reward(prompts, completions, answers, **extras)

    shape = [len(g.samples) for g in groups]
    got = [len(row) for row in out.rewards]
    if got != shape:
        raise RewardError(
            f"reward {type(reward).__name__} returned rewards of shape {got} "
            f"(samples per prompt), expected {shape}"
        )
    return out
