#!/usr/bin/env bash
# Learning curve of the plain student (docs/results/curve/PLAN.md): the shipped recipe (the plain arm of
# scripts/kd_experiment.sh) on 1/2 (sub2), 3/4 (sub4) and all (plain) of the 918 training patients' images,
# 3 seeds each; paired gains of the full set over each subset on the evaluation split, and the curve's
# slope per doubling of the training set (python -m models.curve).
# Usage: bash scripts/learning_curve.sh [RUNS_DIR]   (about 50 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/curve}
PY=${PYTHON:-.venv/bin/python}
ARMS="sub2 sub4 plain" SEEDS="0 1 2" OWN_TEACHER=0 bash scripts/kd_experiment.sh "$RUNS"
"$PY" -m models.evaluate compare --a "$RUNS"/sub2-s[0-9] --b "$RUNS"/plain-s[0-9] --out "$RUNS/gain_full_vs_half.json" | tail -1
"$PY" -m models.evaluate compare --a "$RUNS"/sub4-s[0-9] --b "$RUNS"/plain-s[0-9] --out "$RUNS/gain_full_vs_3q.json" | tail -1
"$PY" -m models.curve "$RUNS"/sub2-s[0-9] "$RUNS"/sub4-s[0-9] "$RUNS"/plain-s[0-9] --target 0.75 \
    --out "$RUNS/curve.json"
