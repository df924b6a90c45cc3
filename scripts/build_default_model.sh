#!/usr/bin/env bash
# From a finished KD experiment to the embedded default model: teacher evaluation, export (fp32 + INT8
# with the verification gate), evaluation of the shipped bundle with the pointing game, benchmark,
# comparison table/plot, model card. Usage: bash scripts/build_default_model.sh [RUNS_DIR] [RUN_NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/kd}
RUN=${2:-kd-s0}
PY=${PYTHON:-.venv/bin/python}
SHARED=${CXR_EDGE_SHARED:-../shared}
TEACHER=$SHARED/teachers/densenet121-nih1071.onnx
mkdir -p build
# 1. teacher on the same evaluation images, with the pointing game
[ -f "$RUNS/teacher_eval.json" ] || "$PY" -m models.evaluate score "$TEACHER" --pointing-game --out "$RUNS/teacher_eval.json"
# 2. export: fp32 (for the benchmark) and INT8 through the gate (the shipped default)
"$PY" -m export --run "$RUNS/$RUN" --format fp32 --out build/student.onnx --report build/student.report.json
"$PY" -m export --run "$RUNS/$RUN" --format int8 --calib-images 200 --fallback-fp32 --out build/student.int8.onnx \
    --report build/default.report.json
cp build/student.int8.onnx cxr_edge/data/default.onnx
# 3. the shipped bundle on the evaluation images, with the pointing game
"$PY" -m models.evaluate score cxr_edge/data/default.onnx --pointing-game --out "$RUNS/shipped_eval.json"
# 4. speed: the runtime bench (fp32 vs INT8) and the comparison with the teacher and PyTorch eager
[ -f build/teacher.onnx ] || "$PY" benchmarks/wrap_teacher.py --out build/teacher.onnx --int8 --measure-auc
"$PY" -m cxr_edge.bench.cli --device cpu --model build/student.onnx --model build/teacher.onnx --format fp32,int8 \
    --threads 1,2 --batch 1,8 --image cxr_edge/data/sample_chest_pa.png --json build/bench_all.json --markdown \
    | tee benchmarks/results/cxr-edge-bench_default_and_teacher_amd-epyc-2c-x86_64.md
"$PY" benchmarks/compare.py --student build/student.onnx --teacher build/teacher.onnx --eager-arch eeea_c2 \
    --eager-checkpoint "$RUNS/$RUN/model_final.pt" --eager-teacher --threads 2 --batch 1,8 --cold-repeats 3 --split-repeats 5
# 5. the model card, from the JSON files above
"$PY" scripts/model_card.py --runs "$RUNS" --run "$RUN" --student-eval "$RUNS/shipped_eval.json" \
    --report build/default.report.json --bench build/bench_all.json --bundle cxr_edge/data/default.onnx
