#!/usr/bin/env bash
# Seeds 1 and 2 of the stride comparison (seed 0: run.sh); same recipe.
set -euo pipefail
cd /work/main
PY=.venv/bin/python
COMMON=(--pretrained --val-fraction 0.15 --epochs 8 --batch-size 32 --lr 6e-4 --head-lr-mult 5
        --weight-decay 0.05 --bootstrap 1000 --device cpu --model efficientnet_lite0 --input-size 224 --box-beta 0.1)
for seed in 1 2; do
for v in s32 s16; do
  name=plain-$v-seed$seed
  if [[ -f runs/stride/$name/metrics.json ]]; then continue; fi
  if [[ $v == s16 ]]; then kw='{"drop_path_rate": 0.1, "last_stride": 1}'; else kw='{"drop_path_rate": 0.1}'; fi
  echo "$(date -u +%H:%M:%S) start $name"
  $PY -m models.train "${COMMON[@]}" --seed $seed --model-kwargs "$kw" --out-dir runs/stride/$name > runs/stride/$name.log 2>&1
  echo "$(date -u +%H:%M:%S) done $name"
  $PY -m models.evaluate score runs/stride/$name --pointing-game --fixed-grid 4 7 14 --out runs/stride/$name.eval.json > runs/stride/$name.eval.log 2>&1
done
done
