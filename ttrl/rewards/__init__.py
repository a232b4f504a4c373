"""Rewards, registered by name: `majority_vote` (TTRL, label-free),
`soft_majority` (EMPO), `co_reward` (a second view votes), `token_entropy`, `self_certainty` and
`trajectory_logprob` (intrinsic, label-free), the methods built for votes that are often wrong
(`self_harmony`, `evol_rl`, `tool_verified`, `scrl`, `rent`, label-free), `ground_truth` (the
oracle baseline), `random` (the control arm), `reward_model` (a learned scorer) and `custom` (a
TRL-style user function).

Build one with `build_reward(name, **options)` and call it only through
`compute_rewards(reward, groups)`, which keeps ground truth away from
label-free rewards. Nothing here imports torch, ray, vllm or deepspeed.
"""

# Importing the modules registers their rewards.
from ttrl.rewards import (  # noqa: F401
    co_reward,
    custom,
    evol_rl,
    ground_truth,
    intrinsic,
    majority,
    random_reward,
    rent,
    scrl,
    self_harmony,
    soft_majority,
    tool_verified,
)
from ttrl.rewards.base import REWARDS, Reward, RewardError, RewardOutput, build_reward, compute_rewards
from ttrl.rewards.co_reward import CoReward
from ttrl.rewards.custom import CustomReward
from ttrl.rewards.evol_rl import EvolRLReward
from ttrl.rewards.ground_truth import GroundTruthReward
from ttrl.rewards.intrinsic import SelfCertaintyReward, TokenEntropyReward, TrajectoryLogprobReward
from ttrl.rewards.majority import MajorityVoteReward
from ttrl.rewards.random_reward import RandomReward
from ttrl.rewards.rent import RentReward
from ttrl.rewards.reward_model import RewardModelReward  # noqa: F401  (registers reward_model)
from ttrl.rewards.scrl import SCRLReward
from ttrl.rewards.self_harmony import SelfHarmonyReward
from ttrl.rewards.soft_majority import SoftMajorityReward
from ttrl.rewards.tool_verified import ToolVerifiedReward

__all__ = [
    "REWARDS",
    "CoReward",
    "CustomReward",
    "EvolRLReward",
    "GroundTruthReward",
    "MajorityVoteReward",
    "RandomReward",
    "RentReward",
    "Reward",
    "RewardError",
    "RewardOutput",
    "SCRLReward",
    "SelfHarmonyReward",
    "SelfCertaintyReward",
    "SoftMajorityReward",
    "TokenEntropyReward",
    "ToolVerifiedReward",
    "TrajectoryLogprobReward",
    "build_reward",
    "compute_rewards",
]
