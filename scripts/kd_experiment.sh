#!/usr/bin/env bash
# The default model's experiment, on the NIH sample, ImageNet-initialised networks:
#   1. (OWN_TEACHER=1) own teacher: TEACHER_MODEL at TEACHER_SIZE px (default EfficientNet-Lite2, 256),
#      TEACHER_FOLDS-fold cross-fitted on the student's training patients (default 2; each fold model
#      also distils the CheXNet-class ensemble where it has rows), so its out-of-fold probabilities are
#      honest soft labels for every training image -> teacher_oof.csv; on other images the teacher is
#      the mean of its fold models (an ensemble);
#   2. students: EfficientNet-Lite0 at 224 px, 3 seeds x {plain, KD}; KD from the CheXNet-class ensemble
#      (and the own teacher with OWN_TEACHER=1: availability-aware averaging, weights 3 : 1), each
#      teacher's logits first refitted to the training labels per label (--teacher-calibration platt:
#      the ensemble is calibrated to the full NIH set, where findings are about half as frequent as
#      in this pool; raw, its KD lowered the covered images' outputs and cost 3 AUC points);
#      both arms: horizontal flips, CAM supervision from the training images' radiologist boxes;
#   3. paired KD gain over the 3 seed pairs.
# Splits: evaluation = teacher_val_images.csv (195 images, never trained on by anything here);
# calibration = a patient-wise 15% of teacher_train_images.csv (--val-fraction 0.15, split seed 0): the
# epoch and the thresholds are chosen there; students train on the rest.
# Usage: bash scripts/kd_experiment.sh [RUNS_DIR] [EPOCHS]   (about 60 minutes on 2 CPU cores; +30 with OWN_TEACHER=1)
# ARMS="plain" trains only the plain arm, SEEDS="0 1 2 3 4" other seeds (scripts/soup_experiment.sh uses both);
# ARMS="ema" the weight-EMA arm (EMA_DECAY, default 0.99), whose runs hold their plain twins (scripts/ema_experiment.sh);
# ARMS="llrd" layer-wise learning-rate decay (LAYER_DECAY, default 0.75; scripts/llrd_experiment.sh);
# ARMS="subK" (K >= 2) the plain arm on (K-1)/K of the training patients (scripts/learning_curve.sh);
# ARMS="mixup" the plain arm with mixup (MIXUP_ALPHA, default 0.2; scripts/mixup_experiment.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/kd}
EPOCHS=${2:-8}
PY=${PYTHON:-.venv/bin/python}
SHARED=${CXR_EDGE_SHARED:-../shared}
ENSEMBLE=$SHARED/teachers/chexnet-ensemble/preds.csv
DEVICE=${DEVICE:-cpu}
OWN_TEACHER=${OWN_TEACHER:-0}
TEACHER_MODEL=${TEACHER_MODEL:-efficientnet_lite2}
TEACHER_SIZE=${TEACHER_SIZE:-256}
TEACHER_FOLDS=${TEACHER_FOLDS:-2}
TEACHER_TAG=${TEACHER_MODEL#efficientnet_}
ARMS=${ARMS:-kd plain}
SEEDS=${SEEDS:-0 1 2}
COMMON=(--pretrained --val-fraction 0.15 --epochs "$EPOCHS" --batch-size 32 --lr 6e-4 --head-lr-mult 5
        --weight-decay 0.05 --model-kwargs '{"drop_path_rate": 0.1}' --bootstrap 1000 --device "$DEVICE" --hflip)
KD=(--teacher-calibration platt --kd-alpha 0.5 --kd-temperature 1)
mkdir -p "$RUNS"
while pgrep -f "models.train .*--out-dir $RUNS/" > /dev/null; do sleep 10; done  # a run left from a restart
run() {  # run NAME ARGS...: skip runs that already finished (resumable experiment)
  local name=$1; shift
  if [[ -f "$RUNS/$name/metrics.json" ]]; then echo "skip $name (done)"; return; fi
  echo "$(date -u +%H:%M:%S) start $name"
  "$PY" -m models.train "$@" --out-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) done $name: $(grep -m1 'mean AUC' "$RUNS/$name.log" || true)"
}
TEACHERS=(--teachers "$ENSEMBLE")
if [[ $OWN_TEACHER == 1 ]]; then
  folds=()
  for ((fold = 0; fold < TEACHER_FOLDS; fold++)); do
    run "teacher-$TEACHER_TAG-f$fold" "${COMMON[@]}" --model "$TEACHER_MODEL" --input-size "$TEACHER_SIZE" \
        --n-folds "$TEACHER_FOLDS" --fold "$fold" --teachers "$ENSEMBLE" "${KD[@]}" --seed 0
    folds+=("$RUNS/teacher-$TEACHER_TAG-f$fold")
  done
  "$PY" -m models.distill oof-csv "${folds[@]}" --out "$RUNS/teacher_oof.csv"
  TEACHERS=(--teachers "$ENSEMBLE" "$RUNS/teacher_oof.csv" --teacher-weights 3 1)
fi
for seed in $SEEDS; do
  if [[ " $ARMS " == *" kd "* ]]; then
    run "kd-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1 \
        "${TEACHERS[@]}" "${KD[@]}"
  fi
  if [[ " $ARMS " == *" ema "* ]]; then  # its raw/ folder is the plain run of the seed (scripts/ema_experiment.sh)
    run "ema-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1 \
        --ema-decay "${EMA_DECAY:-0.99}"
  fi
  if [[ " $ARMS " == *" llrd "* ]]; then  # layer-wise learning-rate decay (scripts/llrd_experiment.sh)
    run "llrd-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1 \
        --layer-decay "${LAYER_DECAY:-0.75}"
  fi
  for arm in $ARMS; do  # subK: the plain recipe on (K-1)/K of the training patients (fold seed % K held out)
    if [[ $arm =~ ^sub([0-9]+)$ ]]; then
      k=${BASH_REMATCH[1]}
      run "$arm-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1 \
          --n-folds "$k" --fold $((seed % k))
    fi
  done
  if [[ " $ARMS " == *" mixup "* ]]; then  # mixup (MIXUP_ALPHA, default 0.2; scripts/mixup_experiment.sh)
    run "mixup-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1 \
        --mixup-alpha "${MIXUP_ALPHA:-0.2}"
  fi
  if [[ " $ARMS " == *" plain "* ]]; then
    run "plain-s$seed" "${COMMON[@]}" --model efficientnet_lite0 --input-size 224 --seed "$seed" --box-beta 0.1
  fi
done
if [[ " $ARMS " == *" kd "* ]]; then
  "$PY" -m models.evaluate compare --a "$RUNS"/plain-s[0-9] --b "$RUNS"/kd-s[0-9] --out "$RUNS/kd_gain.json"
fi
