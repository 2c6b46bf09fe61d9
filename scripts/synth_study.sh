#!/usr/bin/env bash
# The synthetic-truth study (issue 25, docs/synthetic.md): MLSAE vs per-layer SAEs on data with
# known features; three conditions (base, norm growth 19x, 1% sink-like outlier tokens) x a
# drift sweep x seeds (the grid and every command: scripts/synth_study.py).
#
#   scripts/synth_study.sh OUT                       # the whole grid, WORKERS processes
#   DRIFTS="0 30" SEEDS="0" CONDITIONS="base" scripts/synth_study.sh OUT     # a smaller grid
#   SCORE_ONLY=TAG scripts/synth_study.sh OUT        # re-run `mlsae evolution` + `mlsae synth
#                                                    # score` on the trained SAEs (*_TAG rows)
#
# A step whose output exists is skipped; OUT/commands.txt lists every command; the table at the
# end reads the `mlsae synth score` JSONs (OUT/table.md; OUT/runs.md one row per run).
set -euo pipefail
OUT=${1:?usage: scripts/synth_study.sh OUT}
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-2}
read -r -a drifts <<<"${DRIFTS:-0 5 15 30 60}"
read -r -a seeds <<<"${SEEDS:-0 1 2}"
read -r -a conds <<<"${CONDITIONS:-base growth outliers}"
opts=(--workers "$WORKERS" --drifts "${drifts[@]}" --seeds "${seeds[@]}" --conditions "${conds[@]}")
[ -n "${SCORE_ONLY:-}" ] && opts+=(--score-only "$SCORE_ONLY")
mkdir -p "$OUT"
start=$(date +%s)
pids=()
for ((w = 0; w < WORKERS; w++)); do
  nice -n 5 "$PY" scripts/synth_study.py "$OUT" --worker "$w" "${opts[@]}" \
    >>"$OUT/worker$w.out" 2>>"$OUT/worker$w.log" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
echo "wall time $(($(date +%s) - start)) s (workers: $WORKERS)" | tee -a "$OUT/wall_time.txt"
"$PY" scripts/synth_table.py "$OUT" >"$OUT/table.md"
"$PY" scripts/synth_table.py --runs "$OUT" >"$OUT/runs.md"
cat "$OUT/table.md"
exit $status
