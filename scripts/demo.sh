#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct + Wikipedia/SOTU corpus), offline:
# cache -> train MLSAE + single-layer baselines -> evaluate -> cross-layer matrix -> analyze
# -> the explorer's index (then `mlsae explore`).
# Usage: scripts/demo.sh BIN OUT TRAIN_TOKENS TEST_TOKENS [optional stages: evolution lens]
set -euo pipefail
BIN=${1:-.venv/bin}; OUT=${2:-demo_out}; TOK=${3:-60000}; TEST=${4:-8192}; shift 4 || true
EXTRA=" $* "
M="$BIN/mlsae"
R=${DEMO_R:-8}; K=${DEMO_K:-32}; BATCH=${DEMO_BATCH:-4096}
# The paper's lr is 1e-4 for ~1B tokens; a few hundred steps on a CPU need a larger one.
LR=${DEMO_LR:-1e-3}
EARLY=${DEMO_EARLY:-3}; LATE=${DEMO_LATE:-24}
mkdir -p "$OUT"
# Caches resume (or are reused when complete); runs are re-made from scratch each time.
rm -rf "$OUT/mlsae" "$OUT/mlsae_lens" "$OUT"/sae_layer* "$OUT/cross" "$OUT/analysis" "$OUT/lens" "$OUT/per_layer" "$OUT/evolution"
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "1/6 cache $TOK training tokens and $TEST held-out tokens of all 30 layers"
"$M" cache --split train --tokens "$TOK" --out "$OUT/cache_train"
"$M" cache --split test --tokens "$TEST" --out "$OUT/cache_test"
python3 - "$OUT/cache_train/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print({k: m[k] for k in ("model", "dataset", "split", "d_model", "dtype", "n_tokens", "context_length")},
      f"layers {m['layers'][0]}..{m['layers'][-1]}", f"{len(m['shards'])} shards")
PY

stage "2/6 train the MLSAE (R=$R, k=$K) on every layer, and single-layer SAEs at layers $EARLY and $LATE"
"$M" train --cache "$OUT/cache_train" --expansion-factor "$R" -k "$K" --batch-tokens "$BATCH" \
  --lr "$LR" --dead-tokens 20000 --out "$OUT/mlsae"
for L in $EARLY $LATE; do
  # A single layer has 1/30 of the MLSAE's vectors: more passes so it is not left untrained.
  "$M" train --cache "$OUT/cache_train" --single-layer "$L" --expansion-factor "$R" -k "$K" \
    --batch-tokens "$BATCH" --lr "$LR" --dead-tokens 20000 --epochs "${DEMO_SINGLE_EPOCHS:-8}" --out "$OUT/sae_layer$L"
done

stage "3/6 evaluate the MLSAE on held-out tokens (FVU, MSE, L0, delta CE, KL per layer)"
# Delta CE splices each of the 30 layers in turn: measured on the first CE_TOKENS held-out tokens.
"$M" evaluate "$OUT/mlsae" --cache "$OUT/cache_test" --tokens "${DEMO_CE_TOKENS:-2048}" \
  --out "$OUT/mlsae/eval.json"

stage "4/6 cross-layer FVU matrix: single-layer SAEs on every layer vs the MLSAE"
"$M" evaluate --cross "$OUT/mlsae" "$OUT/sae_layer$EARLY" "$OUT/sae_layer$LATE" \
  --cache "$OUT/cache_test" --no-ce --out "$OUT/cross"

EVO=()
if [[ "$EXTRA" == *" evolution "* ]]; then
  stage "evolution: per-layer SAEs on all 30 layers, then features across adjacent layers"
  "$M" train --cache "$OUT/cache_train" --per-layer --expansion-factor "$R" -k "$K" \
    --batch-tokens "$BATCH" --lr "$LR" --dead-tokens 20000 --out "$OUT/per_layer"
  "$M" evolution "$OUT/per_layer" --cache "$OUT/cache_test" --out "$OUT/evolution"
  EVO=(--evolution "$OUT/evolution")
fi

CMP=(--compare "$OUT/sae_layer$LATE")
if [[ "$EXTRA" == *" lens "* ]]; then
  stage "lens: a tuned lens vs the logit lens, then the MLSAE trained in tuned-lens space"
  "$M" lens train --tokens "${DEMO_LENS_TOKENS:-16384}" --out "$OUT/lens"
  "$M" lens evaluate "$OUT/lens" --tokens "${DEMO_LENS_EVAL_TOKENS:-1024}" --out "$OUT/lens/eval.json"
  # Same cache, same settings as the plain MLSAE; T_l is applied to each batch on the fly.
  "$M" train --cache "$OUT/cache_train" --lens "$OUT/lens" --expansion-factor "$R" -k "$K" \
    --batch-tokens "$BATCH" --lr "$LR" --dead-tokens 20000 --out "$OUT/mlsae_lens"
  "$M" evaluate "$OUT/mlsae_lens" --cache "$OUT/cache_test" --tokens "${DEMO_CE_TOKENS:-2048}" \
    --out "$OUT/mlsae_lens/eval.json"
  CMP+=(--compare "$OUT/mlsae_lens")
fi

stage "5/6 analyze: where latents live across layers, residual geometry, report"
"$M" analyze "$OUT/mlsae" --cache "$OUT/cache_test" --out "$OUT/analysis" "${CMP[@]}" \
  --prompt "The capital of France is Paris, and the capital of Italy is Rome." \
  --prompt "Mr. Speaker, the state of our Union is strong." "${EVO[@]}"

stage "6/6 explorer index: top examples, frequencies, layer distributions, logit effects per latent"
"$M" index "$OUT/mlsae" --cache "$OUT/cache_test"
EXPLORE_PL=""
if [[ "$EXTRA" == *" index-per-layer "* ]]; then  # ~20 min for 30 SAEs on 2 cores: optional
  "$M" index "$OUT/per_layer" --cache "$OUT/cache_test"
  EXPLORE_PL="$M explore $OUT/per_layer --evolution $OUT/evolution --port 8766"
fi

stage "done in $(( $(date +%s) - start ))s"
echo "report: $(cd "$OUT/analysis" && pwd)/report.html"
echo "explore the MLSAE's latents (a local web app; open the URL it prints):"
echo "  $M explore $OUT/mlsae"
if [[ -n "$EXPLORE_PL" ]]; then
  echo "explore the per-layer SAEs and their features across layers:"
  echo "  $EXPLORE_PL"
fi
