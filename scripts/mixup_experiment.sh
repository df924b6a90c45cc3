#!/usr/bin/env bash
# Mixup for the plain student (docs/results/mixup/PLAN.md): three seeds of the mixup arm of
# scripts/kd_experiment.sh (MIXUP_ALPHA, default 0.2), BN re-estimation (python -m models.soup) of them and of
# the control (the plain-s* runs of CONTROL, scripts/learning_curve.sh), paired gains, and the calibration-split
# selection against the shipped bundle (selection_vs_shipped.json).
# Usage: bash scripts/mixup_experiment.sh [RUNS_DIR] [CONTROL_DIR]   (about 30 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/mixup}
CONTROL=${2:-runs/curve}
PY=${PYTHON:-.venv/bin/python}
for seed in 0 1 2; do
  [[ -f $CONTROL/plain-s$seed/metrics.json ]] || {
    echo "the control runs are missing: run bash scripts/learning_curve.sh $CONTROL first" >&2; exit 2; }
done
ARMS=mixup SEEDS="0 1 2" OWN_TEACHER=0 bash scripts/kd_experiment.sh "$RUNS"
bn() { [[ -f $2/soup.json ]] || "$PY" -m models.soup "$1" --out "$2" > "$2.log" 2>&1; }
MIX=() BN_MIX=() PLAIN=() BN_PLAIN=()
for seed in 0 1 2; do
  bn "$RUNS/mixup-s$seed" "$RUNS/bn-mixup-s$seed"
  bn "$CONTROL/plain-s$seed" "$RUNS/bn-plain-s$seed"
  MIX+=("$RUNS/mixup-s$seed") BN_MIX+=("$RUNS/bn-mixup-s$seed")
  PLAIN+=("$CONTROL/plain-s$seed") BN_PLAIN+=("$RUNS/bn-plain-s$seed")
done
"$PY" -m models.evaluate compare --a "${PLAIN[@]}" --b "${MIX[@]}" --out "$RUNS/gain_mixup.json" | tail -1
"$PY" -m models.evaluate compare --a "${BN_PLAIN[@]}" --b "${BN_MIX[@]}" --out "$RUNS/gain_bn_mixup.json" | tail -1
"$PY" -m models.evaluate select "${MIX[@]}" "${BN_MIX[@]}" --incumbent cxr_edge/data/default.onnx \
    --out "$RUNS/selection_vs_shipped.json"
