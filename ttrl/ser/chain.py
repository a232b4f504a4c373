"""SER then policy training, in one `ttrl-train` run.

`run_ser_then_policy(cfg, run_dir)`: the SER stage trains a reward model
into <run dir>/ser/final_rm (or reuses it when the run is resumed and it is
already there), points `reward.path` at it when the config says
`reward.path=ser`, rewrites the run dir's config.yaml with the real path,
and hands over to the ordinary training run (`ttrl.run.run`), e.g. PPO
with `reward=reward_model`. Ray is stopped between the stages: each stage
sizes its own local cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ttrl.rewards.reward_model import SER_PATH
from ttrl.rundir import write_resolved_config

__all__ = ["run_ser_then_policy"]


def run_ser_then_policy(cfg: Any, run_dir: Path) -> float | None:
    """Run SER (unless its final RM is already in the run dir), then the policy stage when asked."""
    from ttrl.ser.loop import run_ser

    run_dir = Path(run_dir)
    final = run_dir / "ser" / "final_rm"
    if (final / "ttrl_rm.json").exists() and cfg.trainer.resume != "none":
        print(f"ser: reusing the reward model already in {final} (trainer.resume={cfg.trainer.resume})",
              file=sys.stderr, flush=True)
    else:
        final = run_ser(cfg, run_dir).final_rm
    if not cfg.ser.then_policy:
        return None
    if cfg.reward.name == "reward_model" and cfg.reward.path == SER_PATH:
        cfg.reward.path = str(final.resolve())
        write_resolved_config(cfg, run_dir)
    from ttrl.run import run

    return run(cfg, run_dir)
