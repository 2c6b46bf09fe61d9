#!/usr/bin/env bash
# Seeds of the SAEs behind docs/findings.md's verdicts, at one size that fits a 2-core CPU, on
# any cached model (issue 24 items 2 and 4). Every stage is skipped when OUT/timings.tsv lists
# it, so re-running continues; `python scripts/seeds_report.py OUT ...` prints the tables.
# Usage: scripts/seeds.sh BIN OUT CACHE_TRAIN CACHE_TEST
#   SEEDS="0 1 2"      training seeds (the first is also the seed of the FLIP run)
#   SINGLES="3 12 24"  blocks of the single-layer baselines (the per-layer SAEs at b are them;
#                      those at b+1 give the pass-through b -> b+1)
#   TOKENS=40960       training tokens: the first TOKENS of CACHE_TRAIN (whole shards, linked
#                      into OUT/cache_train by scripts/cache_prefix.py): the same budget on
#                      every model
#   CE_TOKENS=2048     held-out tokens of the delta-CE evaluations (the first contexts)
#   OFF_TOKENS=2048    held-out tokens of the off-diagonal FVU (each baseline on every block,
#                      and the MLSAE on the same tokens)
#   CENTER=auto        --center-layers of the seeds' MLSAEs
#   FLIP=""            on|off: one more MLSAE (first seed) with this --center-layers, analysed
#   FLIP_AFTER=        run the FLIP stages after this many seeds (default: after all of them)
#   R=8 K=32 LR=1e-3 BATCH=4096 DEAD=50000 EPOCHS_SINGLE=4
# Per seed s, in OUT/s<s>/: mlsae/ (one epoch over the TOKENS tokens of every block), per_layer/
# (SAEs of blocks b and b+1 for each b of SINGLES, EPOCHS_SINGLE epochs of their block: the
# baselines' settings), then on CACHE_TEST: fvu_mlsae.json (all held-out tokens, every block),
# fvu_single.json (the baselines on their blocks), off_single_BB.json (baseline BB on every
# block on OFF_TOKENS; off_mlsae.json the MLSAE on the same), ce_mlsae.json / ce_single.json (delta CE at SINGLES on CE_TOKENS), analysis/, and
# controls.json (`mlsae controls measures`: pass-through b -> b+1 beside the seed ceiling, the
# block-b SAE of the next seed in SEEDS, and the token-permuted nulls).
set -euo pipefail
BIN=${1:?BIN}; OUT=${2:?OUT}; CACHE_TRAIN=${3:?CACHE_TRAIN}; CACHE_TEST=${4:?CACHE_TEST}
M="$BIN/mlsae"; PY="$BIN/python"
HERE=$(cd "$(dirname "$0")" && pwd)
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
read -r -a SINGLE_LIST <<< "${SINGLES:-3 12 24}"
TOKENS=${TOKENS:-40960}; CE_TOKENS=${CE_TOKENS:-2048}; OFF_TOKENS=${OFF_TOKENS:-2048}
CENTER=${CENTER:-auto}; FLIP=${FLIP:-}; FLIP_AFTER=${FLIP_AFTER:-${#SEED_LIST[@]}}
R=${R:-8}; K=${K:-32}; LR=${LR:-1e-3}; BATCH=${BATCH:-4096}; DEAD=${DEAD:-50000}
EPOCHS_SINGLE=${EPOCHS_SINGLE:-4}
mkdir -p "$OUT"
LOG="$OUT/timings.tsv"
# shellcheck source=scripts/stages.sh
source "$(dirname "$0")/stages.sh"  # run NAME CMD...: timed, skipped when done
csv() { local IFS=,; echo "$*"; }
SINGLES_CSV=$(csv "${SINGLE_LIST[@]}")
PAIRS=(); for b in "${SINGLE_LIST[@]}"; do PAIRS+=("$b" "$((b + 1))"); done
PAIRS_CSV=$(csv "${PAIRS[@]}")

run cache_prefix "$PY" "$HERE/cache_prefix.py" "$CACHE_TRAIN" "$OUT/cache_train" "$TOKENS"
TRAIN="$OUT/cache_train"
N_LAYERS=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["layers"]))' \
  "$TRAIN/manifest.json")
ALL="0-$((N_LAYERS - 1))"
common=(--cache "$TRAIN" --expansion-factor "$R" -k "$K" --lr "$LR" --batch-tokens "$BATCH"
  --dead-tokens "$DEAD")
test=(--cache "$CACHE_TEST")

controls() {  # controls S S2: seed S's pass-through beside the ceiling from seed S2's SAEs
  run "controls_s$1" "$M" controls measures "$OUT/s$1/per_layer" "${test[@]}" \
    --seed-run "$OUT/s$2/per_layer" --pair-layers "$SINGLES_CSV" --out "$OUT/s$1/controls.json"
}

flip() {  # the multi-layer findings with the other centring (item 4)
  [[ -n "$FLIP" ]] || return 0
  local s=${SEED_LIST[0]} D="$OUT/flip"
  mkdir -p "$D"
  run mlsae_flip "$M" train "${common[@]}" --epochs 1 --center-layers "$FLIP" --seed "$s" \
    --out "$D/mlsae"
  run fvu_flip "$M" evaluate "$D/mlsae" "${test[@]}" --no-ce --out "$D/fvu_mlsae.json"
  run analyze_flip "$M" analyze "$D/mlsae" "${test[@]}" --out "$D/analysis"
}

prev=""; done_seeds=0
for s in "${SEED_LIST[@]}"; do
  D="$OUT/s$s"
  mkdir -p "$D"
  run "mlsae_s$s" "$M" train "${common[@]}" --epochs 1 --center-layers "$CENTER" --seed "$s" \
    --out "$D/mlsae"
  run "per_layer_s$s" "$M" train "${common[@]}" --per-layer --layers "$PAIRS_CSV" \
    --epochs "$EPOCHS_SINGLE" --seed "$s" --out "$D/per_layer"
  run "fvu_mlsae_s$s" "$M" evaluate "$D/mlsae" "${test[@]}" --no-ce --out "$D/fvu_mlsae.json"
  run "fvu_single_s$s" "$M" evaluate "$D/per_layer" "${test[@]}" --layers "$SINGLES_CSV" --no-ce \
    --out "$D/fvu_single.json"
  run "ce_mlsae_s$s" "$M" evaluate "$D/mlsae" "${test[@]}" --layers "$SINGLES_CSV" \
    --tokens "$CE_TOKENS" --out "$D/ce_mlsae.json"
  run "ce_single_s$s" "$M" evaluate "$D/per_layer" "${test[@]}" --layers "$SINGLES_CSV" \
    --tokens "$CE_TOKENS" --out "$D/ce_single.json"
  run "analyze_s$s" "$M" analyze "$D/mlsae" "${test[@]}" --out "$D/analysis"
  run "off_mlsae_s$s" "$M" evaluate "$D/mlsae" "${test[@]}" --tokens "$OFF_TOKENS" --no-ce \
    --out "$D/off_mlsae.json"
  for b in "${SINGLE_LIST[@]}"; do
    BB=$(printf "%02d" "$b")
    run "off_single_${b}_s$s" "$M" evaluate "$D/per_layer/layer_$BB" "${test[@]}" \
      --layers "$ALL" --tokens "$OFF_TOKENS" --no-ce --out "$D/off_single_$BB.json"
  done
  if [[ -n "$prev" ]]; then controls "$prev" "$s"; fi
  prev=$s; done_seeds=$((done_seeds + 1))
  if (( done_seeds == FLIP_AFTER )); then flip; fi
done
if (( ${#SEED_LIST[@]} >= 2 )); then controls "$prev" "${SEED_LIST[0]}"; fi

echo; echo "done: $LOG"
