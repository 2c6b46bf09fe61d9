#!/usr/bin/env bash
# The papers' claims at a stated scale on the embedded default (SmolLM2-135M + Wikipedia/SOTU):
# the runs behind docs/findings.md. A longer study than `make demo` (several hours on 2 CPU
# cores); every stage resumes or is skipped when its output exists, so re-running continues.
# Usage: scripts/findings.sh BIN OUT [TRAIN_TOKENS] [TEST_TOKENS]
# Another model (with a hub): MODEL_ARGS="--model EleutherAI/pythia-70m-deduped --dataset D
#   --text-column text" N_LAYERS=6 SINGLES="1 3 5" scripts/findings.sh .venv/bin runs/pythia
set -euo pipefail
BIN=${1:-.venv/bin}; OUT=${2:-findings_out}; TOK=${3:-180000}; TEST=${4:-8192}
M="$BIN/mlsae"
CTX=256; BATCH=4096; LR=1e-3; DEAD=50000; K=32
N_LAYERS=${N_LAYERS:-30}                       # the model's blocks (SmolLM2: 30)
read -r -a MA <<< "${MODEL_ARGS:-}"            # --model/--dataset/... for the commands that read text
SHORT=$(( 60000 * N_LAYERS / BATCH ))          # steps of the demo's 60k training tokens
LONG=$(( TOK / CTX * (CTX - 1) * N_LAYERS / BATCH ))  # about one pass over TOK tokens (BOS excluded)
EPOCHS_SINGLE=${EPOCHS_SINGLE:-4}; SINGLES=${SINGLES:-"3 12 24"}
CE_TOKENS=${CE_TOKENS:-2048}
mkdir -p "$OUT"
LOG="$OUT/timings.tsv"
# shellcheck source=scripts/stages.sh
source "$(dirname "$0")/stages.sh"  # run NAME CMD...: timed, skipped when done
common=(--batch-tokens "$BATCH" --lr "$LR" --dead-tokens "$DEAD" -k "$K")

run cache_train "$M" cache "${MA[@]}" --split train --tokens "$TOK" --out "$OUT/cache_train"
run cache_test "$M" cache "${MA[@]}" --split test --tokens "$TEST" --out "$OUT/cache_test"

# MLSAEs at two expansion factors (one sweep run: each batch read once), at two training
# lengths: the demo's 60k tokens, then resumed exactly to one pass over all TOK tokens.
run sweep_short "$M" train --cache "$OUT/cache_train" --expansion-factor 8 --expansion-factor 16 \
  "${common[@]}" --max-steps "$SHORT" --out "$OUT/sweep"
for R in 8 16; do
  [[ -d "$OUT/short_R$R" ]] || cp -r "$OUT/sweep/sae_R${R}_k$K" "$OUT/short_R$R"
  run "eval_short_R$R" "$M" evaluate "$OUT/short_R$R" --cache "$OUT/cache_test" \
    --tokens "$CE_TOKENS" --out "$OUT/short_R$R/eval.json"
done
run sweep_long "$M" train --resume "$OUT/sweep" --max-steps "$LONG"
for R in 8 16; do
  run "eval_long_R$R" "$M" evaluate "$OUT/sweep/sae_R${R}_k$K" --cache "$OUT/cache_test" \
    --tokens "$CE_TOKENS" --out "$OUT/sweep/sae_R${R}_k$K/eval.json"
done

# Single-layer baselines (R=8), each on its block's vectors of the same tokens.
for L in $SINGLES; do
  run "single_$L" "$M" train --cache "$OUT/cache_train" --single-layer "$L" --expansion-factor 8 \
    "${common[@]}" --epochs "$EPOCHS_SINGLE" --out "$OUT/single_$L"
done
run cross "$M" evaluate --cross "$OUT/sweep/sae_R8_k$K" $(for L in $SINGLES; do echo "$OUT/single_$L"; done) \
  --cache "$OUT/cache_test" --tokens "$CE_TOKENS" --out "$OUT/cross"

# Where latents live: both variance formulas, multi-layer fractions, geometry, per R.
for R in 8 16; do
  run "analyze_R$R" "$M" analyze "$OUT/sweep/sae_R${R}_k$K" --cache "$OUT/cache_test" \
    --out "$OUT/analysis_R$R" --compare "$OUT/single_12"
done

# Features across layers: per-layer SAEs with the single-layer baselines' settings and budget.
run per_layer "$M" train --cache "$OUT/cache_train" --per-layer --expansion-factor 8 "${common[@]}" \
  --epochs "$EPOCHS_SINGLE" --out "$OUT/per_layer"
run evolution "$M" evolution "$OUT/per_layer" --cache "$OUT/cache_test" --out "$OUT/evolution"
# Like for like: each per-layer SAE of a baseline's block and that baseline, on all test positions.
mkdir -p "$OUT/lfl"
for L in $SINGLES; do
  LL=$(printf "%02d" "$L")
  run "fvu_per_layer_$L" "$M" evaluate "$OUT/per_layer/layer_$LL" --cache "$OUT/cache_test" --no-ce \
    --out "$OUT/lfl/per_layer_layer_$LL.json"
  run "fvu_single_$L" "$M" evaluate "$OUT/single_$L" --cache "$OUT/cache_test" --no-ce \
    --out "$OUT/lfl/single_$L.json"
done
# The tuned lens (SPEC 5, the default KL training) and an MLSAE in lens space (60k tokens).
run lens_train "$M" lens train "${MA[@]}" --tokens 16384 --out "$OUT/lens"
run lens_eval "$M" lens evaluate "$OUT/lens" "${MA[@]}" --tokens 2048 --out "$OUT/lens/eval.json"
# The unfloored lens's I + A_l can exceed the exact inverse's condition limit (1e6) at a block;
# the lens-space MLSAE uses the floored lens (--min-singular 0.9, SUGGESTED_MIN_SINGULAR).
run lens_floor "$M" lens train "${MA[@]}" --tokens 16384 --min-singular 0.9 --out "$OUT/lens_floor"
run lens_floor_eval "$M" lens evaluate "$OUT/lens_floor" "${MA[@]}" --tokens 2048 --out "$OUT/lens_floor/eval.json"
run lens_mlsae "$M" train --cache "$OUT/cache_train" --lens "$OUT/lens_floor" --expansion-factor 8 \
  "${common[@]}" --max-steps "$SHORT" --out "$OUT/mlsae_lens"
run eval_lens_mlsae "$M" evaluate "$OUT/mlsae_lens" --cache "$OUT/cache_test" --tokens "$CE_TOKENS" \
  --out "$OUT/mlsae_lens/eval.json"
run analyze_lens "$M" analyze "$OUT/short_R8" --cache "$OUT/cache_test" --out "$OUT/analysis_lens" \
  --compare "$OUT/mlsae_lens"

echo; echo "done: $LOG"
