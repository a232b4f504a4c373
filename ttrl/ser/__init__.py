"""SER: Self-Evolved Reward learning (Huang et al., ICLR 2025, arXiv 2411.00418).

A reward model trained on a small labelled seed labels the rest of the data
itself, keeping only what its learning status says it is sure of, and is
retrained on the growing set, round after round; then the policy trains
against it (PPO with `reward=reward_model`).

- `filter.py`  the learning-status rules and the stop rule (pure functions)
- `losses.py`  Bradley-Terry and pointwise losses (pure torch)
- `loop.py`    the rounds on the reward-model workers (ttrl/trainer/reward_model.py)
- `chain.py`   `run_ser_then_policy`: SER, then the policy stage of `ttrl-train`
- `experiment.py`  the seed-only / SER / all-labels comparison on the synthetic task

Importing this package is cheap: the heavy parts load on call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_ser", "run_ser_then_policy"]


def run_ser(cfg: Any, run_dir: Any, quiet: bool | None = None) -> Any:
    from ttrl.ser.loop import run_ser as _run

    return _run(cfg, run_dir, quiet)


def run_ser_then_policy(cfg: Any, run_dir: Any) -> float | None:
    from ttrl.ser.chain import run_ser_then_policy as _run

    return _run(cfg, run_dir)
