#!/bin/bash
# PPO vs GRPO vs SER on the demo task, beside TTRL's majority vote and the
# ground-truth oracle; then one table and one plot per arm.
#   experiments/sweeps/ppo_grpo_ser.sh [more overrides]        # e.g. trainer.total_steps=40
#   SEEDS="0 1 2" ARMS="ppo_rm grpo_rm" experiments/sweeps/ppo_grpo_ser.sh
# The arms (each a `ttrl-train` run per seed, its W&B job type = the arm):
#   ser_chain    experiment=ser_demo: SER trains a reward model from 15% labels, then PPO against it
#   ppo_rm       PPO against one SER reward model, trained once for the sweep (RM_SEED)
#   grpo_rm      GRPO against that same reward model
#   majority     experiment=demo: TTRL, rewarded by agreement with the majority vote
#   oracle       experiment=demo reward=ground_truth: the labels the others do without
# All policy arms start from the same warm start (WARMSTART) and are evaluated
# alike (the 128 held-out sums, 16 samples each, every 10 steps). The W&B group
# is the sweep's (logger=wandb logger.wandb.mode=offline adds W&B without an
# account). A finished run (its dir has training.png) is not run again, so a
# killed sweep continues where it stopped; a run that fails is reported and
# the sweep goes on. About 7-10 minutes a policy run on 2 cores, plus 10-20
# for each SER stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ARMS=${ARMS:-"ser_chain ppo_rm grpo_rm majority oracle"}
SEEDS=${SEEDS:-"0 1"}
RM_SEED=${RM_SEED:-100}
WARMSTART=${WARMSTART:-"0:0"}
OUT=${OUT:-multirun/ppo-grpo-ser-$(date +%Y-%m-%d_%H-%M-%S)}
BIN=${BIN:-$([ -x .venv/bin/ttrl-train ] && echo .venv/bin/ || echo "")}
m=${WARMSTART%%:*}; d=${WARMSTART##*:}
for a in $ARMS; do
  case $a in ser_chain|ppo_rm|grpo_rm|majority|oracle) ;;
    *) echo "unknown arm '$a' (ser_chain ppo_rm grpo_rm majority oracle)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
GROUP=${GROUP:-ppo-grpo-ser/$(basename "$OUT")}
echo "PPO vs GRPO vs SER -> $OUT (arms: $ARMS; seeds: $SEEDS; warm start: $WARMSTART; overrides: $*)"

train() {  # train <run dir> <arm> <overrides...>
  local dir=$1 arm=$2; shift 2
  if [ -f "$dir/training.png" ] || [ -f "$dir/ser/summary.json" -a "${RM_ONLY:-}" = 1 ]; then
    echo "== $dir: done already"; return 0
  fi
  echo "== $(date +%T) $dir"
  "${BIN}ttrl-train" "$@" model.tiny.seed="$m" model.warmstart.seed="$d" trainer.resume=none \
    logger.wandb.group="$GROUP" logger.wandb.job_type="$arm" hydra.run.dir="$dir" > "$dir.log" 2>&1 \
    || { echo "!! $dir exited $? (see $dir.log)"; return 0; }
  tail -n 8 "$dir.log" | grep -E "pass@1|maj@|collapse|done in" || true
}

# The reward model the ppo_rm and grpo_rm arms share: SER alone, once.
RM="$OUT/rm_ser_s$RM_SEED/ser/final_rm"
case " $ARMS " in *" ppo_rm "*|*" grpo_rm "*)
  RM_ONLY=1 train "$OUT/rm_ser_s$RM_SEED" rm experiment=ser_demo ser.then_policy=false seed="$RM_SEED" "$@"
  [ -f "$RM/ttrl_rm.json" ] || { echo "!! no reward model in $RM: the ppo_rm and grpo_rm arms cannot run" >&2; exit 1; }
esac

for s in $SEEDS; do
  for a in $ARMS; do
    case $a in
      ser_chain) train "$OUT/${a}_s$s" "$a" experiment=ser_demo seed="$s" "$@" ;;
      ppo_rm)    train "$OUT/${a}_s$s" "$a" experiment=ser_demo ser.enabled=false reward.path="$RM" seed="$s" "$@" ;;
      grpo_rm)   train "$OUT/${a}_s$s" "$a" experiment=ser_demo ser.enabled=false reward.path="$RM" algorithm=grpo \
                   seed="$s" "$@" ;;
      majority)  train "$OUT/${a}_s$s" "$a" experiment=demo seed="$s" "$@" ;;
      oracle)    train "$OUT/${a}_s$s" "$a" experiment=demo reward=ground_truth seed="$s" "$@" ;;
    esac
  done
done
# The RM-only run has no policy steps and no evals: it is left out of the per-arm report.
"${BIN}ttrl-compare" $(ls -d "$OUT"/*_s*/ | grep -v "/rm_ser_s") --arms --out "$OUT/report"
