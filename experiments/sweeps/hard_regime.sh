#!/bin/bash
# Where the vote is wrong: every method built for that regime beside TTRL's
# majority vote, the ground-truth oracle and the random control, on the hard
# test beds, over several warm starts x seeds; a model-collapse probe per warm
# start; then per bed one table and one plot per arm (--arms) and the
# collapse-step tables (--collapse-step).
#   experiments/sweeps/hard_regime.sh [more overrides]          # e.g. trainer.total_steps=40
#   BEDS=demo_hard ARMS="majority_vote tool_verified" WARMSTARTS="0:0 1:1 4:7" SEEDS="0 1" \
#     experiments/sweeps/hard_regime.sh
#   DRY_RUN=1 experiments/sweeps/hard_regime.sh                  # print the commands, run nothing
# Beds (BEDS): experiment=demo_hard (the demo's recipe on demo_collapse's
# weaker warm start) and experiment=demo_hard_4terms (four-term sums).
# Arms (ARMS): reward=<arm> on the bed, nothing else changed, except evol_rl,
# which also gets the paper's update options: algorithm.clip_high=0.28 and
# algorithm.entropy_coef=0.001 (EVOL_RL_OPTS). majority_vote is TTRL,
# ground_truth the oracle, random the control. Every arm runs every warm start
# (MODEL_SEED:DATA_SEED, model.tiny.seed:model.warmstart.seed, as in
# demo_grid.sh) and every seed; its W&B job type is the arm.
# Probes: one `debug=collapse_probe` run per bed and warm start (token_entropy,
# at most 20 steps, stops at the first consensus firing; PROBE_REWARD).
# Resumable: a finished run (training.png) or a probe that stopped at its
# collapse step is not run again, so a killed sweep continues where it
# stopped; a failed run is reported and the sweep goes on.
# Across machines (ARCHIVE=experiments/results/hard_regime): each finished
# run and probe is also kept there, small enough to commit (config.yaml and
# its metrics and votes gzipped), a run found there is not run again, and the
# reports are made from the archive, so sessions on different machines add
# up to one table. A warm start is built where it runs, and another CPU's
# build of the same seeds has other weights: a run whose starting weights
# (`model/fingerprint`, logged with its first step) differ from the archive's
# runs of its bed and warm start is not archived, and that warm start's other
# runs are skipped on this machine (run them where the archive's were built).
# Cost on 2 cores: 4.5-6 minutes a run on an Intel Xeon with AMX, 6-7.5 on
# an AMD EPYC (demo_hard_4terms 7.5-9; self_harmony up to 10.5: it samples
# twice as much; scrl and rent add one trainer forward pass a step), 1-3 a
# probe, plus 4-12 the first time a warm start is built: with the defaults
# (2 beds x 3 warm starts x 2 seeds x 8 arms = 96 runs and 6 probes) 8-14
# hours, so several sessions with ARCHIVE.
# Output, per bed: $OUT/<bed>/<arm>_ws<m>-<d>_s<seed>/, $OUT/<bed>/probes/,
# and $OUT/report/<bed>/ ($ARCHIVE/report/<bed>/ with an archive) with arms.md/png (per arm: median and worst gain, maj
# after, guard firings), collapse.md (each run's collapse step),
# floor/collapse.md (the same with the drift judged above its sampling floor,
# FLOOR_LIMITS: raw drift off, safety.max_excess_drift=0.15) and
# probes/collapse.md (each warm start's probe beside its TTRL gain, Spearman).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BEDS=${BEDS:-"demo_hard demo_hard_4terms"}
ARMS=${ARMS:-"majority_vote self_harmony evol_rl tool_verified scrl rent ground_truth random"}
WARMSTARTS=${WARMSTARTS:-"0:0 1:1 4:7"}
SEEDS=${SEEDS:-"0 1"}
PROBE_REWARD=${PROBE_REWARD:-token_entropy}
EVOL_RL_OPTS=${EVOL_RL_OPTS:-"algorithm.clip_high=0.28 algorithm.entropy_coef=0.001"}
OUT=${OUT:-multirun/hard-regime-$(date +%Y-%m-%d_%H-%M-%S)}
BIN=${BIN:-$([ -x .venv/bin/ttrl-train ] && echo .venv/bin/ || echo "")}
DRY_RUN=${DRY_RUN:-0}
ARCHIVE=${ARCHIVE:-}
FLOOR_LIMITS=${FLOOR_LIMITS:-"--limit max_first_vote_drift=null --limit max_excess_drift=0.15"}
for b in $BEDS; do
  [ -f "conf/experiment/$b.yaml" ] || { echo "hard_regime: no experiment '$b' (conf/experiment/$b.yaml)" >&2; exit 2; }
done
for a in $ARMS; do
  [ -f "conf/reward/$a.yaml" ] || { echo "hard_regime: no reward '$a' in ARMS (conf/reward/$a.yaml)" >&2; exit 2; }
done
echo "hard regime -> $OUT (beds: $BEDS; arms: $ARMS; warm starts: $WARMSTARTS; seeds: $SEEDS; overrides: $*)"

done_in() {  # done_in <run dir> <full|probe>: a finished run, or a probe its guard stopped
  [ -f "$1/training.png" ] || { [ "$2" = probe ] && grep -qs '"safety/collapse_step"' "$1/metrics.jsonl"; }
}

archive() {  # archive <run dir>: keep what the reports read, gzipped; config.yaml last (it marks the copy whole)
  [ -n "$ARCHIVE" ] || return 0
  local dest="$ARCHIVE/${1#"$OUT"/}" f
  mkdir -p "$dest"
  for f in metrics votes; do
    if [ -f "$1/$f.jsonl" ]; then gzip -9 -n -c "$1/$f.jsonl" > "$dest/$f.jsonl.gz"; fi
  done
  cp "$1/config.yaml" "$dest/config.yaml"
}

fingerprint() {  # fingerprint <metrics.jsonl[.gz]>: the model/fingerprint its run logged, or nothing
  { if [[ $1 == *.gz ]]; then gzip -dc "$1"; else cat "$1"; fi; } 2>/dev/null \
    | grep -o '"model/fingerprint": "[0-9a-f]*"' | head -n 1 | grep -o '[0-9a-f]\{16\}' || true
}

declare -A OTHER_WEIGHTS=()  # <bed>/<ws>: this machine's build of that warm start is not the archive's

warm_key() {  # warm_key <run dir>: <bed>/ws<m>-<d>, the bed and warm start a run or probe dir belongs to
  local rel=${1#"$OUT"/}
  echo "${rel%%/*}/$(basename "$1" | grep -o 'ws[0-9]*-[0-9]*')"
}

keep() {  # keep <run dir>: archive it, unless it started from other weights than the archive's runs of its warm start
  local key bed ws mine theirs f
  key=$(warm_key "$1"); bed=${key%%/*}; ws=${key#*/}
  mine=$(fingerprint "$1/metrics.jsonl")
  if [ -n "$ARCHIVE" ] && [ -n "$mine" ]; then
    for f in "$ARCHIVE/$bed"/*_"${ws}"_s*/metrics.jsonl.gz "$ARCHIVE/$bed/probes/probe_${ws}/metrics.jsonl.gz"; do
      [ -f "$f" ] || continue
      theirs=$(fingerprint "$f")
      if [ -n "$theirs" ] && [ "$theirs" != "$mine" ]; then
        echo "!! $1 started from weights $mine, the archive's $bed runs of $ws from $theirs (another" \
          "machine's build): not archived; $ws's other runs are skipped here (run them where $theirs was built)"
        OTHER_WEIGHTS["$key"]=1
        return 0
      fi
    done
  fi
  archive "$1"
}

run() {  # run <run dir> <done test: full|probe> <ttrl-train arguments...>
  local dir=$1 kind=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then echo "${BIN}ttrl-train $* hydra.run.dir=$dir"; return 0; fi
  if [ -n "$ARCHIVE" ] && [ -f "$ARCHIVE/${dir#"$OUT"/}/config.yaml" ]; then
    echo "== $dir: archived already"; return 0
  fi
  if [ -n "${OTHER_WEIGHTS[$(warm_key "$dir")]:-}" ]; then
    echo "== $dir: skipped (this machine's build of its warm start is not the archive's)"; return 0
  fi
  if done_in "$dir" "$kind"; then
    echo "== $dir: done already"; keep "$dir"; return 0
  fi
  mkdir -p "$(dirname "$dir")"
  echo "== $(date +%T) $dir"
  # A probe ends with exit status 3 when its guard stops it: that is its answer, not a failure.
  local rc=0
  "${BIN}ttrl-train" "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ] && ! { [ "$kind" = probe ] && [ "$rc" = 3 ]; }; then echo "!! $dir exited $rc (see $dir.log)"; fi
  if done_in "$dir" "$kind"; then keep "$dir"; fi
  tail -n 8 "$dir.log" | grep -E "pass@1|maj@|collapse|stopped|done in" || true
}

for bed in $BEDS; do
  for ws in $WARMSTARTS; do
    m=${ws%%:*}; d=${ws##*:}
    warm=(model.tiny.seed="$m" model.warmstart.seed="$d")
    run "$OUT/$bed/probes/probe_ws${m}-${d}" probe experiment="$bed" debug=collapse_probe reward="$PROBE_REWARD" \
      "${warm[@]}" seed=0 trainer.resume=none logger.wandb.job_type=probe "$@"
    for arm in $ARMS; do
      extra=()
      [ "$arm" = evol_rl ] && read -r -a extra <<< "$EVOL_RL_OPTS"
      for s in $SEEDS; do
        run "$OUT/$bed/${arm}_ws${m}-${d}_s${s}" full experiment="$bed" reward="$arm" ${extra[@]+"${extra[@]}"} "${warm[@]}" \
          seed="$s" trainer.resume=none logger.wandb.job_type="$arm" "$@"
      done
    done
  done
done

# The reports read the archive when there is one: it holds every session's runs.
SRC=${ARCHIVE:-$OUT}
for bed in $BEDS; do
  rep="$SRC/report/$bed"
  ttrl_runs=$(ls -d "$SRC/$bed"/majority_vote_ws*/ 2>/dev/null || true)
  if [ "$DRY_RUN" = 1 ]; then
    echo "${BIN}ttrl-compare $SRC/$bed --arms --out $rep"
    echo "${BIN}ttrl-compare $SRC/$bed --collapse-step --out $rep"
    echo "${BIN}ttrl-compare $SRC/$bed --collapse-step $FLOOR_LIMITS --out $rep/floor"
    echo "${BIN}ttrl-compare $SRC/$bed/probes --collapse-step --against <the majority_vote runs> --out $rep/probes"
    continue
  fi
  # Each report is its own step: one that cannot be made (no finished run yet) does not stop the others.
  "${BIN}ttrl-compare" "$SRC/$bed" --arms --out "$rep" || echo "!! no --arms report for $bed"
  "${BIN}ttrl-compare" "$SRC/$bed" --collapse-step --out "$rep" > /dev/null || echo "!! no --collapse-step report for $bed"
  # shellcheck disable=SC2086  # FLOOR_LIMITS is several arguments
  "${BIN}ttrl-compare" "$SRC/$bed" --collapse-step $FLOOR_LIMITS --out "$rep/floor" > /dev/null \
    || echo "!! no floor-corrected --collapse-step report for $bed"
  if [ -n "$ttrl_runs" ]; then
    # shellcheck disable=SC2086  # one argument per run dir
    "${BIN}ttrl-compare" "$SRC/$bed/probes" --collapse-step --against $ttrl_runs --out "$rep/probes" \
      || echo "!! no probe report for $bed"
  fi
done
