"""A learned reward: a reward model (e.g. the one SER trained) scores each completion.

    ttrl-train algorithm=ppo reward=reward_model reward.path=<RM dir>

The RM dir is a Hugging Face sequence classifier with one output plus
`ttrl_rm.json` (written by ttrl/ser/ when it saves a reward model) that says
how (prompt, response) becomes its input text. Each sample's reward is the
RM's score of (the prompt's problem, the completion): the raw score (a
Bradley-Terry logit: only differences between samples mean something, which
is all that group-normalised or critic-based advantages use) or, with
`transform="sigmoid"`, sigmoid(score) in (0, 1) (the RM's probability that
the response is good; the default for pointwise RMs). `ttrl_rm.json` holds
the default; the `transform` option overrides it.

The model runs in a Ray actor (`RewardModelScorer`), started on the first
call, when the Runtime has already started Ray. It asks Ray for no CPU slot
by default: it works only while the loop waits for it, and the Runtime sizes
a local cluster to its own actors exactly. It never sees ground truth
(`needs_ground_truth` is False: `compute_rewards` hands it scrubbed prompts)
and returns no votes, so the loop votes itself for its label metrics.
Nothing here imports torch, ray, vllm or deepspeed at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ttrl.rewards.base import REWARDS, RewardOutput
from ttrl.types import Prompt

__all__ = ["SER_PATH", "RewardModelReward"]

# reward.path=ser: "the RM this run's SER stage trains" (filled in by ttrl.ser.chain).
SER_PATH = "ser"


@REWARDS.register("reward_model")
class RewardModelReward:
    needs_ground_truth = False

    def __init__(self, path: str | None = None, transform: str | None = None, batch_size: int = 64,
                 num_cpus: float = 0.0, num_gpus: float = 0.0, device: str = "auto"):
        if not path:
            raise ValueError("reward 'reward_model' needs reward.path: a reward model dir (for example "
                             "<run dir>/ser/final_rm from an SER run)")
        if path == SER_PATH:
            raise ValueError("reward.path=ser names the reward model of this run's SER stage, which has not "
                             "run: use ttrl.ser.run_ser_then_policy (ser.enabled=true) or give a model dir")
        p = Path(path).expanduser()
        if not (p / "config.json").exists():
            raise ValueError(f"reward.path={path}: no reward model there (no config.json)")
        if transform not in (None, "raw", "sigmoid"):
            raise ValueError(f"reward 'reward_model': transform={transform!r} must be raw, sigmoid or None")
        self.path, self.transform, self.batch_size = str(p), transform, batch_size
        self.num_cpus, self.num_gpus, self.device = num_cpus, num_gpus, device
        self._actor: Any = None

    def _scorer(self) -> Any:
        if self._actor is None:
            import ray

            from ttrl.trainer.reward_model import RewardModelScorer

            if not ray.is_initialized():
                raise RuntimeError("reward 'reward_model' scores in a Ray actor, and Ray is not running")
            cls = ray.remote(RewardModelScorer)
            self._actor = cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                self.path, self.device, "auto", self.batch_size)
        return self._actor

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import ray

        return ray.get(self._scorer().score.remote(prompts, responses, self.transform))

    def __call__(
        self,
        prompts: list[Prompt],
        completions: list[list[str]],
        answers: list[list[str | None]],
    ) -> RewardOutput:
        flat_p = [p.problem for p, row in zip(prompts, completions, strict=True) for _ in row]
        flat_c = [c for row in completions for c in row]
        scores = self.score(flat_p, flat_c) if flat_c else []
        rewards, start = [], 0
        for row in completions:
            rewards.append([float(x) for x in scores[start:start + len(row)]])
            start += len(row)
        return RewardOutput(rewards=rewards, votes=None)

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
