#!/usr/bin/env bash
# Plain vs KD student on the NIH sample, same settings, 3 seeds each; evaluation on the teacher's
# validation images (never seen by the teacher or the students). Two runs at a time, one thread each
# (small depthwise convs scale poorly across threads on this 2-core CPU).
# Usage: bash scripts/kd_experiment.sh [RUNS_DIR] [EPOCHS] [INPUT_SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/kd}
EPOCHS=${2:-15}
SIZE=${3:-128}
PY=${PYTHON:-.venv/bin/python}
TEACHER=${TEACHER:-../shared/teachers/densenet121-nih1071.onnx}
COMMON=(--model eeea_c2 --input-size "$SIZE" --epochs "$EPOCHS" --batch-size 32 --threads 1 --bootstrap 1000)
mkdir -p "$RUNS"
for seed in 0 1 2; do
  "$PY" -m models.train "${COMMON[@]}" --seed "$seed" --out-dir "$RUNS/plain-s$seed" > "$RUNS/plain-s$seed.log" 2>&1 &
  "$PY" -m models.train "${COMMON[@]}" --seed "$seed" --teachers "$TEACHER" --kd-alpha 0.5 --kd-temperature 2 \
      --out-dir "$RUNS/kd-s$seed" > "$RUNS/kd-s$seed.log" 2>&1 &
  wait
done
"$PY" -m models.evaluate compare --a "$RUNS"/plain-s[0-9] --b "$RUNS"/kd-s[0-9] --out "$RUNS/kd_gain.json"
