#!/usr/bin/env bash
# Weight averaging of the plain students (docs/results/soup/PLAN.md): five seeds of the plain arm of
# scripts/kd_experiment.sh, three soups of them (python -m models.soup), the shipped candidate by the
# calibration split (selection.json), and on the evaluation split the five-seed probability ensemble
# (a reference: five networks) and each soup's paired gain over its ingredients.
# Usage: bash scripts/soup_experiment.sh [RUNS_DIR]   (about 45 minutes on 2 CPU cores, 6 after training)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/soup}
PY=${PYTHON:-.venv/bin/python}
ARMS=plain SEEDS="0 1 2 3 4" OWN_TEACHER=0 bash scripts/kd_experiment.sh "$RUNS"
SEEDS=("$RUNS"/plain-s[0-4])
soup() { local out=$1; shift; [[ -f $out/soup.json ]] || "$PY" -m models.soup "$@" --out "$out"; }
soup "$RUNS/soup-uniform" "${SEEDS[@]}"
soup "$RUNS/soup-uniform-bnavg" "${SEEDS[@]}" --bn average
soup "$RUNS/soup-greedy" "${SEEDS[@]}" --recipe greedy
soup "$RUNS/soup3-uniform" "$RUNS"/plain-s[0-2]          # reference: three ingredients
"$PY" -m models.evaluate select "${SEEDS[@]}" "$RUNS/soup-uniform" "$RUNS/soup-uniform-bnavg" "$RUNS/soup-greedy" \
    --out "$RUNS/selection.json"
"$PY" -m models.evaluate teacher --reference "$RUNS/plain-s0" --runs "${SEEDS[@]}" --out "$RUNS/ensemble5_eval.json"
for s in soup-uniform soup-uniform-bnavg soup-greedy soup3-uniform; do  # each soup minus each of its ingredients
  n=${#SEEDS[@]}; [[ $s == soup3-uniform ]] && n=3
  "$PY" -m models.evaluate compare --a "${SEEDS[@]:0:$n}" --b $(for ((k = 0; k < n; k++)); do echo "$RUNS/$s"; done) \
      --out "$RUNS/gain_$s.json" | tail -1
done
