#!/usr/bin/env bash
# Every run behind RESULTS.md, on real CIFAR-10, sized for about 90 minutes of a 2-core CPU, in
# float32: on the development CPU (an Intel Xeon with AVX512-BF16) bf16 autocast measured no faster than
# float32 (benchmarks/train_throughput.py, README "Benchmarks"). Then analysis/results.py writes RESULTS.md from the
# Parquet tables alone.
#
#   analysis/make_results.sh DATA_DIR [STUDIES_DIR]      (make results DATA_DIR=... )
#
# The budget, the same for every accuracy it compares: 9,000 training images x 5 epochs,
# validated on 5,000 (a stratified 14,000-image subset of the 50,000 training images), the
# second report's conditioned CNN at a quarter of its widths (32,64,128 instead of 128,256,512).
# A study folder already there is resumed with the same flags (a finished one returns at once).
set -euo pipefail
DATA_DIR=${1:?usage: analysis/make_results.sh DATA_DIR [STUDIES_DIR]}
STUDIES=${2:-studies/results}
PY=${PYTHON:-python}
EPOCHS=5
DATA=(--data cifar10 --data-dir "$DATA_DIR" --subset 14000 --val-size 5000 --precision fp32)
STUDY=(--storage-path "$STUDIES" --wandb disabled --cpus-per-trial 1 --max-concurrent 2)
WIDTH=(--set filters=32,64,128)

study() {  # NAME ARGS...: run a study; one already there is resumed (a finished one returns at once)
  local name=$1; shift
  local resume=()
  if [ -f "$STUDIES/$name/study.json" ]; then resume=(--resume); fi
  echo "== $name: $PY -m tune_cifar.search --name $name ${resume[*]} $*"
  $PY -m tune_cifar.search --name "$name" "${resume[@]}" "$@"
}
retrain() {  # NAME ARGS...: train --train-on-val over 3 seeds, test once per seed (a folder there is kept;
  local name=$1; shift   # move an incomplete one away to redo it)
  if [ -d "$STUDIES/$name/trials" ]; then echo "kept: $STUDIES/$name"; return; fi
  echo "== $name: $PY -m tune_cifar.train --out $STUDIES/$name $*"
  $PY -m tune_cifar.train --out "$STUDIES/$name" "$@"
}

# 1. The second report's four factor tables: one factor varied, the rest at seed_best, 3 seeds.
#    The schedules are scaled to the budget: the report's step_size 8 and patience 3 never fire in 5 epochs.
for factor in optimizers schedulers losses activations; do
  scaled=()
  if [ "$factor" = schedulers ]; then scaled=(--set step_size=2 --set patience=1); fi
  study "grid_$factor" --space "grid_$factor" --max-epochs $EPOCHS --seeds 3 "${WIDTH[@]}" "${scaled[@]}" \
    "${DATA[@]}" "${STUDY[@]}"
done
# 2. Tuned (TPE + ASHA over the full space, same width and budget) against hand-tuned (seed_best),
#    each retrained on train + validation with 3 seeds and tested once per seed on all 10,000 test images.
#    Warm-up is held at 0 (as in seed_best): the space samples up to 5 epochs of it, the whole budget.
study full --space full --num-samples 24 --max-epochs $EPOCHS --grace-period 1 --set warmup_epochs=0 "${WIDTH[@]}" \
  "${DATA[@]}" "${STUDY[@]}"
retrain retrain_tuned --from-study "$STUDIES/full" --data-dir "$DATA_DIR" --train-on-val --full-test --seeds 3 \
  --epochs $EPOCHS
retrain retrain_hand --config search_spaces/seed_best.yaml "${WIDTH[@]}" "${DATA[@]}" --train-on-val --full-test \
  --seeds 3 --epochs $EPOCHS
# 3. The BN landscape: VGG-A with and without BN, the course's Adam grid and Santurkar et al.'s SGD grid.
#    VGG-A is the expensive network here (about 13x the MACs of the narrowed CNN): 3 epochs with Adam
#    (a probe every 25 steps), 1 epoch with SGD (a probe every 10 steps: 7 probes per run).
study bn_adam --space bn_landscape --max-epochs 3 --set probe_every=25 "${DATA[@]}" "${STUDY[@]}"
study bn_sgd --space bn_landscape_sgd --max-epochs 1 --set probe_every=10 "${DATA[@]}" "${STUDY[@]}"

$PY analysis/results.py "$STUDIES"
