#!/usr/bin/env bash
# Stride-16 (14x14 CAM) vs stride-32 (7x7) last stage, same plain recipe, seed 0.
set -euo pipefail
cd /work/main
PY=.venv/bin/python
COMMON=(--pretrained --val-fraction 0.15 --epochs 8 --batch-size 32 --lr 6e-4 --head-lr-mult 5
        --weight-decay 0.05 --bootstrap 1000 --device cpu --model efficientnet_lite0 --input-size 224 --seed 0 --box-beta 0.1)
for v in s32 s16; do
  if [[ -f runs/stride/plain-$v/metrics.json ]]; then continue; fi
  if [[ $v == s16 ]]; then kw='{"drop_path_rate": 0.1, "last_stride": 1}'; else kw='{"drop_path_rate": 0.1}'; fi
  echo "$(date -u +%H:%M:%S) start $v"
  $PY -m models.train "${COMMON[@]}" --model-kwargs "$kw" --out-dir runs/stride/plain-$v > runs/stride/plain-$v.log 2>&1
  echo "$(date -u +%H:%M:%S) done $v"
  $PY -m models.evaluate score runs/stride/plain-$v --pointing-game --fixed-grid 4 7 14 --out runs/stride/plain-$v.eval.json > runs/stride/plain-$v.eval.log 2>&1
done
