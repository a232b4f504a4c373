#!/bin/bash
# The demo over several warm starts x seeds, with the ground-truth oracle and a
# random-reward control beside it, then one table and one plot of every run.
#   experiments/sweeps/demo_grid.sh [more overrides]        # e.g. trainer.lr=2e-5
#   WARMSTARTS="0:0 5:7" SEEDS="0 1 2" ARMS="ttrl" experiments/sweeps/demo_grid.sh
# A warm start is a pair MODEL_SEED:DATA_SEED (model.tiny.seed, the random
# init, and model.warmstart.seed, the order and slips of its training data):
# each pair is a different starting model, like the one another machine builds.
# ttrl runs every seed; the oracle and the random control run the first seed
# of each warm start. A finished run (its dir has training.png) is not run
# again, so a killed grid continues where it stopped. Each run takes ~7 min on
# 2 cores, plus ~9 min the first time a warm start is built (README: the grid).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WARMSTARTS=${WARMSTARTS:-"0:0 1:1 4:7 9:2"}
SEEDS=${SEEDS:-"0 1"}
ARMS=${ARMS:-"ttrl oracle random"}
OUT=${OUT:-multirun/demo-grid-$(date +%Y-%m-%d_%H-%M-%S)}
BIN=${BIN:-$([ -x .venv/bin/ttrl-train ] && echo .venv/bin/ || echo "")}
mkdir -p "$OUT"
echo "demo grid -> $OUT (warm starts: $WARMSTARTS; seeds: $SEEDS; arms: $ARMS; overrides: $*)"

one() {  # one(arm, model_seed, data_seed, seed, run_dir, overrides...)
  local arm=$1 m=$2 d=$3 s=$4 dir=$5 exp
  shift 5
  case $arm in
    ttrl) exp=(experiment=demo) ;;
    oracle) exp=(experiment=demo_oracle) ;;
    random) exp=(experiment=demo reward=random) ;;
    *) echo "demo_grid: unknown arm '$arm' in ARMS (ttrl, oracle, random)" >&2; exit 2 ;;
  esac
  if [ -f "$dir/training.png" ]; then echo "== $dir: done already"; return; fi
  echo "== $(date +%T) $dir"
  # A run that fails (or that its guard stops) is recorded, and the grid goes on.
  "${BIN}ttrl-train" "${exp[@]}" model.tiny.seed="$m" model.warmstart.seed="$d" seed="$s" \
    trainer.resume=none hydra.run.dir="$dir" "$@" > "$dir.log" 2>&1 \
    || echo "!! $dir exited $? (see $dir.log)"
  tail -n 8 "$dir.log" | grep -E "pass@1|maj@|collapse|done in" || true
}

first_seed=${SEEDS%% *}
for ws in $WARMSTARTS; do
  m=${ws%%:*}; d=${ws##*:}
  for arm in $ARMS; do
    for s in $SEEDS; do
      [ "$arm" != ttrl ] && [ "$s" != "$first_seed" ] && continue
      one "$arm" "$m" "$d" "$s" "$OUT/${arm}_ws${m}-${d}_s${s}" "$@"
    done
  done
done
"${BIN}ttrl-compare" "$OUT" --grid --out "$OUT/report"
