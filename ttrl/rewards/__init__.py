"""Rewards, registered by name: `majority_vote` (TTRL, label-free),
`soft_majority` (EMPO), `co_reward` (a second view votes), `token_entropy`, `self_certainty` and
`trajectory_logprob` (intrinsic, label-free), `ground_truth` (the oracle
baseline), `random` (the control arm), `reward_model` (a learned scorer) and
`custom` (a TRL-style user function).

Build one with `build_reward(name, **options)` and call it only through
`compute_rewards(reward, groups)`, which keeps ground truth away from
label-free rewards. Nothing here imports torch, ray, vllm or deepspeed.
"""

# Importing the modules registers their rewards.
from ttrl.rewards import co_reward, custom, ground_truth, intrinsic, majority, random_reward, soft_majority  # noqa: F401
from ttrl.rewards.base import REWARDS, Reward, RewardError, RewardOutput, build_reward, compute_rewards
from ttrl.rewards.co_reward import CoReward
from ttrl.rewards.custom import CustomReward
from ttrl.rewards.ground_truth import GroundTruthReward
from ttrl.rewards.intrinsic import SelfCertaintyReward, TokenEntropyReward, TrajectoryLogprobReward
from ttrl.rewards.majority import MajorityVoteReward
from ttrl.rewards.random_reward import RandomReward
from ttrl.rewards.reward_model import RewardModelReward  # noqa: F401  (registers reward_model)
from ttrl.rewards.soft_majority import SoftMajorityReward

__all__ = [
    "REWARDS",
    "CoReward",
    "CustomReward",
    "GroundTruthReward",
    "MajorityVoteReward",
    "RandomReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "SelfCertaintyReward",
    "SoftMajorityReward",
    "TokenEntropyReward",
    "TrajectoryLogprobReward",
    "build_reward",
    "compute_rewards",
]
