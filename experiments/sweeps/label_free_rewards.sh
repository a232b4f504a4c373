#!/bin/bash
# Every label-free reward on the demo task, beside the ground-truth oracle and
# the random control, at least 2 seeds each; then one table (report/grid.md)
# and one plot of pass@1 over steps per reward (report/arms.png).
#   experiments/sweeps/label_free_rewards.sh [more overrides]     # e.g. algorithm=grpo
#   REWARDS="majority_vote self_certainty" SEEDS="0 1 2" experiments/sweeps/label_free_rewards.sh
# Each run is `ttrl-train experiment=demo reward=<name>` on one warm start
# (WARMSTART, model.tiny.seed:model.warmstart.seed), so the rewards differ in
# the reward alone: same model, data, algorithm (Dr. GRPO), learning rate and
# collapse guard. The intrinsic rewards live on their own scales (nats,
# log-probs) and Dr. GRPO does not divide advantages by the group's spread:
# pass algorithm=grpo to compare them on normalised advantages instead.
# A finished run (its dir has training.png) is not run again, so a killed
# sweep continues where it stopped. About 7 minutes a run on 2 cores
# (co_reward samples twice as much; token_entropy and self_certainty add one
# trainer forward pass a step).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REWARDS=${REWARDS:-"majority_vote soft_majority co_reward token_entropy self_certainty trajectory_logprob ground_truth random"}
SEEDS=${SEEDS:-"0 1"}
WARMSTART=${WARMSTART:-"0:0"}
OUT=${OUT:-multirun/label-free-rewards-$(date +%Y-%m-%d_%H-%M-%S)}
BIN=${BIN:-$([ -x .venv/bin/ttrl-train ] && echo .venv/bin/ || echo "")}
m=${WARMSTART%%:*}; d=${WARMSTART##*:}
mkdir -p "$OUT"
echo "label-free rewards -> $OUT (rewards: $REWARDS; seeds: $SEEDS; warm start: $WARMSTART; overrides: $*)"
for r in $REWARDS; do
  for s in $SEEDS; do
    dir="$OUT/${r}_ws${m}-${d}_s${s}"
    if [ -f "$dir/training.png" ]; then echo "== $dir: done already"; continue; fi
    echo "== $(date +%T) $dir"
    # A run that fails (or that its guard stops) is recorded, and the sweep goes on.
    "${BIN}ttrl-train" experiment=demo reward="$r" model.tiny.seed="$m" model.warmstart.seed="$d" seed="$s" \
      trainer.resume=none hydra.run.dir="$dir" "$@" > "$dir.log" 2>&1 \
      || echo "!! $dir exited $? (see $dir.log)"
    tail -n 8 "$dir.log" | grep -E "pass@1|maj@|collapse|done in" || true
  done
done
"${BIN}ttrl-compare" "$OUT" --grid --out "$OUT/report"          # grid.md: per run and per reward, before/after
"${BIN}ttrl-compare" "$OUT" --arms --out "$OUT/report" >/dev/null # arms.png: pass@1 over steps per reward, seed band
