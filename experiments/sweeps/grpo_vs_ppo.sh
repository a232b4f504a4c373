#!/bin/bash
# GRPO vs PPO, 3 seeds each, on this machine (jobs one after another), then the comparison.
#   experiments/sweeps/grpo_vs_ppo.sh [more overrides]      e.g. experiment=demo
# On SLURM (one job per run, in parallel): add cluster=slurm hydra.launcher.partition=...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SWEEP=${SWEEP:-multirun/grpo-vs-ppo-$(date +%Y-%m-%d_%H-%M-%S)}
ttrl-train -m algorithm=grpo,ppo seed=0,1,2 hydra.sweep.dir="$SWEEP" "${@:-experiment=demo}"
ttrl-compare "$SWEEP" --out "$SWEEP/compare"
