#!/usr/bin/env bash
# Layer-wise learning-rate decay of the plain student (docs/results/llrd/PLAN.md): three seeds of the llrd
# arm of scripts/kd_experiment.sh, their BN re-estimation (python -m models.soup), paired gains against the
# plain runs of the same seeds (the raw/ twins of CONTROL, scripts/ema_experiment.sh, and their BN
# re-estimation), and the candidates' calibration-split selection (selection.json).
# Usage: bash scripts/llrd_experiment.sh [RUNS_DIR] [CONTROL_DIR]   (about 27 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/llrd}
CONTROL=${2:-runs/ema}
PY=${PYTHON:-.venv/bin/python}
for seed in 0 1 2; do
  [[ -f $CONTROL/ema-s$seed/raw/metrics.json && -f $CONTROL/bn-raw-s$seed/soup.json ]] || {
    echo "the control runs are missing: run bash scripts/ema_experiment.sh $CONTROL first" >&2; exit 2; }
done
ARMS=llrd SEEDS="0 1 2" OWN_TEACHER=0 bash scripts/kd_experiment.sh "$RUNS"
LLRD=() BN_LLRD=() RAW=() BN_RAW=()
for seed in 0 1 2; do
  [[ -f $RUNS/bn-llrd-s$seed/soup.json ]] || "$PY" -m models.soup "$RUNS/llrd-s$seed" --out "$RUNS/bn-llrd-s$seed" \
      > "$RUNS/bn-llrd-s$seed.log" 2>&1
  LLRD+=("$RUNS/llrd-s$seed") BN_LLRD+=("$RUNS/bn-llrd-s$seed")
  RAW+=("$CONTROL/ema-s$seed/raw") BN_RAW+=("$CONTROL/bn-raw-s$seed")
done
"$PY" -m models.evaluate compare --a "${RAW[@]}" --b "${LLRD[@]}" --out "$RUNS/gain_llrd.json" | tail -1
"$PY" -m models.evaluate compare --a "${BN_RAW[@]}" --b "${BN_LLRD[@]}" --out "$RUNS/gain_bn_llrd.json" | tail -1
"$PY" -m models.evaluate select "${LLRD[@]}" "${BN_LLRD[@]}" --out "$RUNS/selection.json"
