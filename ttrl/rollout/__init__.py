"""Rollout: engines that sample completions and receive new weights."""
