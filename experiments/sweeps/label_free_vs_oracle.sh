#!/bin/bash
# TTRL's label-free reward (majority vote) against the ground-truth oracle, GRPO, 2 seeds.
#   experiments/sweeps/label_free_vs_oracle.sh [more overrides]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SWEEP=${SWEEP:-multirun/ttrl-vs-oracle-$(date +%Y-%m-%d_%H-%M-%S)}
ttrl-train -m reward=majority_vote,ground_truth seed=0,1 eval.at_start=true eval.at_end=true \
  hydra.sweep.dir="$SWEEP" "${@:-experiment=demo}"
ttrl-compare "$SWEEP" --out "$SWEEP/compare"
