set -e
PY=.venv/bin/python
COMMON=(--pretrained --val-fraction 0.15 --epochs 8 --batch-size 32 --lr 6e-4 --head-lr-mult 5
        --weight-decay 0.05 --model-kwargs '{"drop_path_rate": 0.1}' --bootstrap 1000 --device cpu --hflip)
for seed in 1 2; do
  [[ -f runs/soupinit/init0-s$seed/metrics.json ]] && continue
  echo "$(date -u +%H:%M:%S) start init0-s$seed"
  $PY -m models.train "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed $seed --init-seed 0 --box-beta 0.1 --out-dir runs/soupinit/init0-s$seed > runs/soupinit/init0-s$seed.log 2>&1
  echo "$(date -u +%H:%M:%S) done init0-s$seed: $(grep -m1 'mean AUC' runs/soupinit/init0-s$seed.log)"
done
