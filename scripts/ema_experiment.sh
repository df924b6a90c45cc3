#!/usr/bin/env bash
# Weight EMA of the plain students (docs/results/ema/PLAN.md): three seeds of the ema arm of
# scripts/kd_experiment.sh (each run's raw/ folder is the same trajectory's plain run), BN re-estimation
# of both (python -m models.soup, one ingredient) at 224 px and at 256 px (test size, plan addendum 1),
# paired gains on the evaluation split, and the shipped candidate by the calibration split (selection.json;
# selection_with_256.json when the 256 px model meets the speed goal).
# Usage: bash scripts/ema_experiment.sh [RUNS_DIR]   (about 30 minutes on 2 CPU cores, 3 after training)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/ema}
PY=${PYTHON:-.venv/bin/python}
ARMS=ema SEEDS="0 1 2" OWN_TEACHER=0 bash scripts/kd_experiment.sh "$RUNS"
bn() { [[ -f $2/soup.json ]] || "$PY" -m models.soup "$1" --out "$2" "${@:3}" > "$2.log" 2>&1; }
EMA=() RAW=() BN_EMA=() BN_RAW=() BN256_EMA=() BN256_RAW=()
for seed in 0 1 2; do
  bn "$RUNS/ema-s$seed" "$RUNS/bn-ema-s$seed"
  bn "$RUNS/ema-s$seed/raw" "$RUNS/bn-raw-s$seed"
  bn "$RUNS/ema-s$seed" "$RUNS/bn256-ema-s$seed" --input-size 256   # plan addendum 1: test size
  bn "$RUNS/ema-s$seed/raw" "$RUNS/bn256-raw-s$seed" --input-size 256
  EMA+=("$RUNS/ema-s$seed") RAW+=("$RUNS/ema-s$seed/raw") BN_EMA+=("$RUNS/bn-ema-s$seed") BN_RAW+=("$RUNS/bn-raw-s$seed")
  BN256_EMA+=("$RUNS/bn256-ema-s$seed") BN256_RAW+=("$RUNS/bn256-raw-s$seed")
done
"$PY" -m models.evaluate compare --a "${BN_RAW[@]}" --b "${BN256_RAW[@]}" --out "$RUNS/gain_256_raw.json" | tail -1
"$PY" -m models.evaluate compare --a "${BN_EMA[@]}" --b "${BN256_EMA[@]}" --out "$RUNS/gain_256_ema.json" | tail -1
"$PY" -m models.evaluate compare --a "${RAW[@]}" --b "${EMA[@]}" --out "$RUNS/gain_ema.json" | tail -1
"$PY" -m models.evaluate compare --a "${BN_RAW[@]}" --b "${BN_EMA[@]}" --out "$RUNS/gain_bn_ema.json" | tail -1
"$PY" -m models.evaluate compare --a "${RAW[@]}" --b "${BN_RAW[@]}" --out "$RUNS/gain_bn_raw.json" | tail -1
"$PY" -m models.evaluate select "${EMA[@]}" "${RAW[@]}" "${BN_EMA[@]}" "${BN_RAW[@]}" --out "$RUNS/selection.json"
# with the 256 px candidates: used only if the 256 px model meets the speed goal (plan addendum 1)
"$PY" -m models.evaluate select "${EMA[@]}" "${RAW[@]}" "${BN_EMA[@]}" "${BN_RAW[@]}" "${BN256_EMA[@]}" "${BN256_RAW[@]}" \
    --out "$RUNS/selection_with_256.json"
