"""A learned reward: a reward model (e.g. the one SER trained) scores each completion.

    ttrl-train algorithm=ppo reward=reward_model reward.path=<RM dir>

The RM dir is a Hugging Face sequence classifier with one output plus
`ttrl_rm.json` (written by ttrl/ser/ when it saves a reward model) that says
how (prompt, response) becomes its input text and whether a score is the raw
logit or its sigmoid. Each sample's reward is the RM's score of (the
prompt's problem, the completion).

This module only turns scores into rewards. The model itself runs wherever
the code that builds the run puts it: `ttrl.parts.reward_options` checks the
dir with `check_reward_model_dir` and hands in a scorer
(`ttrl.trainer.reward_model.RemoteRewardModel`, a Ray actor started on first
use) through the `RewardScorer` protocol below; tests hand in a fake. The
reward never sees ground truth (`needs_ground_truth` is False:
`compute_rewards` hands it scrubbed prompts) and returns no votes, so the loop
votes itself for its label metrics. Must never import torch, ray, vllm,
deepspeed or anything in ttrl/trainer/ (tests/unit/test_imports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ttrl.rewards.base import REWARDS, Reward, RewardOutput
from ttrl.types import Prompt

__all__ = ["SER_PATH", "EnsembleScorer", "RewardModelReward", "RewardScorer", "RunningMoments",
           "check_reward_model_dir"]

# reward.path=ser: "the RM this run's SER stage trains" (filled in by ttrl.ser.chain).
SER_PATH = "ser"


class RewardScorer(Protocol):
    """What the `reward_model` reward needs from whatever runs the reward model."""

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per (prompt, completion) pair, in order."""
        ...

    def close(self) -> None:
        """Let the model go (an actor, GPU memory); called once, when the run ends."""
        ...


def check_reward_model_dir(path: str | None) -> str:
    """The RM dir `reward.path` names, expanded; ValueError with one sentence when it cannot be one."""
    if not path:
        raise ValueError("reward 'reward_model' needs reward.path: a reward model dir (for example "
                         "<run dir>/ser/final_rm from an SER run)")
    if path == SER_PATH:
        raise ValueError("reward.path=ser names the reward model of this run's SER stage, which has not "
                         "run: use ttrl.ser.run_ser_then_policy (ser.enabled=true) or give a model dir")
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise ValueError(f"reward.path={path}: no reward model there (no config.json)")
    return str(p)


class EnsembleScorer:
    """Several reward models as one scorer: each scores every pair, the scores are combined
    by their mean or, more conservatively, their minimum (a policy must please every RM,
    so one RM's blind spot is not worth finding). Pure: the scorers are handed in."""

    def __init__(self, scorers: list[RewardScorer], reduce: str = "mean"):
        if not scorers:
            raise ValueError("an ensemble of reward models needs at least one scorer")
        if reduce not in ("mean", "min"):
            raise ValueError(f"ensemble reduce={reduce!r} must be mean or min")
        self.scorers, self.reduce = list(scorers), reduce

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        per_rm = [s.score(prompts, completions) for s in self.scorers]
        for i, sc in enumerate(per_rm):
            if len(sc) != len(completions):
                raise ValueError(f"reward model {i} of the ensemble returned {len(sc)} scores for "
                                 f"{len(completions)} completions")
        if self.reduce == "min":
            return [min(col) for col in zip(*per_rm)]
        return [sum(col) / len(col) for col in zip(*per_rm)]

    def close(self) -> None:
        for s in self.scorers:
            s.close()


class RunningMoments:
    """Mean and variance of every value seen so far (Welford's update; numerically stable)."""

    def __init__(self) -> None:
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def update(self, xs: list[float]) -> None:
        for x in xs:
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self._m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return (self._m2 / (self.n - 1)) ** 0.5 if self.n > 1 else 1.0


@REWARDS.register("reward_model")
class RewardModelReward(Reward):
    """The RM's score per completion, with the defences against reward hacking a user can switch on
    (each off by default; applied in this order):

    - `normalize`: (score - running mean) / running std, over every score of the run so far, so
      the reward's scale does not depend on the RM's (a resumed run starts its moments again);
    - `clip`: the result clamped to [-clip, clip]: no single sample the RM loves without bound;
    - `length_penalty`: minus this much per response token (the rollout's own token count), against
      a policy that pads its answers for an RM that favours long ones. It only pushes toward short
      answers: a likelihood head (which favours short ones already) gets no help from it.
    KL to the reference policy is the algorithm's (algorithm.kl_coef); an ensemble of RMs is the
    scorer's (`EnsembleScorer`, reward.ensemble).
    """

    needs_ground_truth = False

    def __init__(self, scorer: RewardScorer, normalize: bool = False, clip: float | None = None,
                 length_penalty: float = 0.0):
        if clip is not None and clip <= 0:
            raise ValueError(f"reward 'reward_model': clip={clip} must be > 0 (or None)")
        if length_penalty < 0:
            raise ValueError(f"reward 'reward_model': length_penalty={length_penalty} must be >= 0")
        self.scorer, self.normalize, self.clip, self.length_penalty = scorer, normalize, clip, length_penalty
        self.moments = RunningMoments()
        # The token counts come from the rollout's log-probs: only asked for when they are used.
        self.needs = frozenset({"logprobs"}) if length_penalty else frozenset()

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
        logprobs: list[list[list[float]]] | None = None,
    ) -> RewardOutput:
        flat_p = [p.problem for p, row in zip(prompts, completions, strict=True) for _ in row]
        flat_c = [c for row in completions for c in row]
        scores = self.scorer.score(flat_p, flat_c) if flat_c else []
        if len(scores) != len(flat_c):
            raise ValueError(f"the reward model's scorer returned {len(scores)} scores for {len(flat_c)} "
                             "completions")
        values = [float(x) for x in scores]
        if self.normalize and values:
            self.moments.update(values)
            sd = max(self.moments.std, 1e-6)
            values = [(x - self.moments.mean) / sd for x in values]
        if self.clip is not None:
            values = [min(self.clip, max(-self.clip, x)) for x in values]
        if self.length_penalty:
            if logprobs is None:
                raise ValueError("reward 'reward_model' with length_penalty needs the samples' log-probs")
            lengths = [len(lp) for row in logprobs for lp in row]
            values = [x - self.length_penalty * n for x, n in zip(values, lengths, strict=True)]
        rewards, start = [], 0
        for row in completions:
            rewards.append(values[start:start + len(row)])
            start += len(row)
        return RewardOutput(rewards=rewards, votes=None)

    def close(self) -> None:
        self.scorer.close()
