#!/usr/bin/env bash
# Every run behind RESULTS.md, on real CIFAR-10, in float32 (on the development CPU, an Intel Xeon with
# AVX512-BF16, bf16 autocast measured no faster: README "Benchmarks"), in chunks of at most about
# 2.5 hours of a 2-core CPU. Each chunk's studies resume where a stop left them (run the same command
# again); a finished chunk ends with its reports written under results/ from the Parquet tables alone,
# so a later session can regenerate RESULTS.md without the study folders.
#
#   analysis/make_results.sh DATA_DIR [STUDIES_DIR] [CHUNK]      (make results DATA_DIR=... [CHUNK=n])
#
#   chunk  what                                                               wall time, 2-core Intel Xeon
#   1      optimizer: each level tuned (8 lr values) and confirmed (5 seeds)  62 min (measured 2026-12-01)
#   2      scheduler, the same protocol                                        56 min (measured 2026-12-01)
#   3      loss and activation, the same protocol                              107 min (measured 2026-12-01: 63 + 44)
#   4      optimizer at 45,000 images x 10 epochs, the tuned lr, 3 seeds        73 min (measured 2026-12-01, 12 runs)
#   5      tuned (TPE + ASHA) against hand-tuned; the BN landscape (VGG-A)     about 2 h (estimated)
#   (measured with other work on the machine part of the time: 72 runs of 9,000 images x 5 epochs each)
#   all    1 to 5 in order (the default), then RESULTS.md
#
# The small budget, the same for every accuracy it compares: 9,000 training images x 5 epochs, validated
# on 5,000 (a stratified 14,000-image subset of the 50,000 training images), the second report's
# conditioned CNN at a quarter of its widths (32,64,128 instead of 128,256,512).
set -euo pipefail
DATA_DIR=${1:?usage: analysis/make_results.sh DATA_DIR [STUDIES_DIR] [CHUNK]}
STUDIES=${2:-studies/results}
CHUNK=${3:-all}
PY=${PYTHON:-python}
EPOCHS=5
SMALL=(--data cifar10 --data-dir "$DATA_DIR" --subset 14000 --val-size 5000 --precision fp32)
LARGE=(--data cifar10 --data-dir "$DATA_DIR" --val-size 5000 --precision fp32)
RUN=(--storage-path "$STUDIES" --wandb disabled --cpus-per-trial 1 --max-concurrent 2)
WIDTH=(--set filters=32,64,128)

study() {  # NAME ARGS...: run a study; one already there is resumed (a finished one returns at once)
  local name=$1; shift
  local resume=()
  if [ -f "$STUDIES/$name/study.json" ]; then resume=(--resume); fi
  echo "== $name: $PY -m tune_cifar.search --name $name ${resume[*]} $*"
  $PY -m tune_cifar.search --name "$name" "${resume[@]}" "$@"
}
compare() {  # NAME ARGS...: a fair comparison (continued if there), then its report into results/
  local name=$1; shift
  echo "== $name: $PY -m tune_cifar.compare --name $name $*"
  $PY -m tune_cifar.compare --name "$name" "$@"
  $PY analysis/comparison.py "$STUDIES/$name" --out results/comparisons
}
retrain() {  # NAME ARGS...: train --train-on-val over 3 seeds, test once per seed (a folder there is kept;
  local name=$1; shift   # move an incomplete one away to redo it)
  if [ -d "$STUDIES/$name/trials" ]; then echo "kept: $STUDIES/$name"; return; fi
  echo "== $name: $PY -m tune_cifar.train --out $STUDIES/$name $*"
  $PY -m tune_cifar.train --out "$STUDIES/$name" "$@"
}
factor() {  # FACTOR [ARGS...]: the second report's factor table, each level at its own tuned lr
  local factor=$1; shift
  compare "fair_$factor" --space "grid_$factor" --max-epochs $EPOCHS "${WIDTH[@]}" "$@" "${SMALL[@]}" "${RUN[@]}"
}

chunk() { [ "$CHUNK" = all ] || [ "$CHUNK" = "$1" ]; }

# 1-3. The second report's four factor tables with every level tuned (compare: 8 lr values per level,
#      selected on validation, then the baseline's lr and the selected lr each over 5 fresh seeds).
#      The schedules are scaled to the budget: the report's step_size 8 and patience 3 never fire in 5 epochs.
if chunk 1; then factor optimizers; fi
if chunk 2; then factor schedulers --set step_size=2 --set patience=1; fi
if chunk 3; then factor losses; factor activations; fi
# 4. The optimizer table at a larger budget: all 45,000 training images x 10 epochs, each optimizer at
#    the lr chosen at the small budget, 3 fresh seeds. Does the ordering hold?
if chunk 4; then
  compare fair_optimizers_large --space grid_optimizers --selected-from "$STUDIES/fair_optimizers" --views tuned \
    --confirm-seeds 3 --max-epochs 10 "${WIDTH[@]}" "${LARGE[@]}" "${RUN[@]}"
fi
# 5. Tuned (TPE + ASHA over the full space, same width and budget) against hand-tuned (seed_best),
#    each retrained on train + validation with 3 seeds and tested once per seed on all 10,000 test images.
#    Warm-up is held at 0 (as in seed_best): the space samples up to 5 epochs of it, the whole budget.
#    Then the BN landscape: VGG-A with and without BN, the course's Adam grid and Santurkar et al.'s SGD
#    grid. VGG-A is the expensive network here (about 13x the MACs of the narrowed CNN): 3 epochs with
#    Adam (a probe every 25 steps), 1 epoch with SGD (a probe every 10 steps: 7 probes per run).
if chunk 5; then
  study full --space full --num-samples 24 --max-epochs $EPOCHS --grace-period 1 --set warmup_epochs=0 \
    "${WIDTH[@]}" "${SMALL[@]}" "${RUN[@]}"
  retrain retrain_tuned --from-study "$STUDIES/full" --data-dir "$DATA_DIR" --train-on-val --full-test --seeds 3 \
    --epochs $EPOCHS
  retrain retrain_hand --config search_spaces/seed_best.yaml "${WIDTH[@]}" "${SMALL[@]}" --train-on-val \
    --full-test --seeds 3 --epochs $EPOCHS
  study bn_adam --space bn_landscape --max-epochs 3 --set probe_every=25 "${SMALL[@]}" "${RUN[@]}"
  study bn_sgd --space bn_landscape_sgd --max-epochs 1 --set probe_every=10 "${SMALL[@]}" "${RUN[@]}"
fi

$PY analysis/results.py "$STUDIES"
