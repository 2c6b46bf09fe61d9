#!/usr/bin/env bash
# The synthetic-truth study (issue 25, docs/synthetic.md): MLSAE vs per-layer SAEs on data with
# known features, over a drift sweep and seeds, plus three arms at zero drift (norm growth 19x
# with and without the MLSAE's per-vector standardisation; sink-like outliers; per-layer SAEs
# trained with standardisation, evolution with and without --rescale).
#
#   scripts/synth_study.sh OUT            # the grid below (minutes on a CPU)
#   DRIFTS="0 30" SEEDS="0" scripts/synth_study.sh OUT     # a smaller grid
#   ARMS=0 ...                            # skip the three zero-drift arms
#
# Every step is a plain mlsae command on a normal activation cache; the table at the end reads
# the `mlsae synth score` JSONs (OUT/table.md).
set -euo pipefail
OUT=${1:?usage: scripts/synth_study.sh OUT}
DRIFTS=${DRIFTS-"0 5 15 30 60"}  # an empty value: no drift sweep (e.g. the arms only)
SEEDS=${SEEDS-"0 1 2"}
ARMS=${ARMS:-1}
MLSAE=${MLSAE:-.venv/bin/mlsae}
M="nice -n 5 $MLSAE"
DATA="--n-layers 6 --d-model 64 --n-features 48 --tokens 8192 --test-tokens 2048"
ML="--expansion-factor 2 -k 4 --batch-tokens 1024 --epochs 8 --lr 1e-3"
PL="--per-layer --expansion-factor 1 -k 4 --batch-tokens 256 --epochs 8 --lr 2e-3"
mkdir -p "$OUT"
start=$(date +%s)

mlsae_arm() {  # name, extra train options: MLSAE trained and scored
  local d=$OUT/$1
  [ -f "$d/mlsae$3.json" ] && return
  $M train --cache "$d/data/train" --out "$d/mlsae$3" $ML --seed "$2" "${@:4}" >"$d/log_mlsae$3" 2>&1
  $M synth score "$d/mlsae$3" --truth "$d/data" --out "$d/mlsae$3.json" >>"$d/log_mlsae$3" 2>&1
}

per_layer_arm() {  # name, seed, suffix, normalize, extra evolution options
  local d=$OUT/$1
  [ -f "$d/per_layer$3.json" ] && return
  [ -d "$d/per_layer_$4" ] || $M train --cache "$d/data/train" --out "$d/per_layer_$4" $PL \
    --seed "$2" --normalize "$4" >"$d/log_pl$3" 2>&1
  $M evolution "$d/per_layer_$4" --cache "$d/data/test" --out "$d/evolution$3" "${@:5}" \
    >>"$d/log_pl$3" 2>&1
  $M synth score "$d/per_layer_$4" --truth "$d/data" --evolution "$d/evolution$3" \
    --out "$d/per_layer$3.json" >>"$d/log_pl$3" 2>&1
}

dataset() {  # name, seed, generate options
  local d=$OUT/$1
  [ -f "$d/data/truth.json" ] || $M synth generate --out "$d/data" $DATA --seed "$2" "${@:3}" \
    >"$d.log" 2>&1
}

for seed in $SEEDS; do
  for drift in $DRIFTS; do
    name=drift${drift}_seed${seed}
    echo "[$(($(date +%s) - start)) s] $name"
    dataset "$name" "$seed" --drift-deg "$drift"
    mlsae_arm "$name" "$seed" ""
    per_layer_arm "$name" "$seed" "" none
  done
done

if [ "$ARMS" = 1 ]; then
  echo "[$(($(date +%s) - start)) s] arms"
  dataset growth19_seed0 0 --norm-growth 19
  mlsae_arm growth19_seed0 0 ""
  mlsae_arm growth19_seed0 0 _none --normalize none
  dataset outliers_seed0 0 --outlier-fraction 0.01
  mlsae_arm outliers_seed0 0 ""
  per_layer_arm outliers_seed0 0 "" none
  name=drift0_seed0  # per-layer SAEs with standardisation: evolution with / without rescale
  dataset "$name" 0 --drift-deg 0
  per_layer_arm "$name" 0 _std standardize
  per_layer_arm "$name" 0 _std_norescale standardize --no-rescale
fi
echo "[$(($(date +%s) - start)) s] done"
"${MLSAE%/mlsae}/python" scripts/synth_table.py "$OUT" | tee "$OUT/table.md"
