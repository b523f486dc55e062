#!/usr/bin/env bash
# The core-pipeline check on real data with minilm-l6, seed 42, on RTE, MRPC, STS-B, CoLA
# and CB: a Pfeiffer adapter (paper settings: rf 16, ReLU, lr 1e-4, best epoch on dev) and
# full fine-tuning (lr 2e-5, 10% warm-up), then `evaluate` on every run folder.
# CPU budget (2 cores): training on a 2,000-example seeded subsample of each training set
# (CB: all 250), 3 epochs for the adapter (the paper allows up to 30) and 2 for full
# fine-tuning; dev sets are whole.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/core_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs}
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
for task in cb cola stsb mrpc rte; do
  adapterbench extract --task "$task" --model minilm-l6 --seed 42 --out "$OUT" train.epochs=3 train.limit=2000
  adapterbench finetune --task "$task" --model minilm-l6 --seed 42 --out "$OUT" train.epochs=2 train.limit=2000 \
    train.save_model=true
done
for run in "$OUT"/extract/pfeiffer/*/*/ "$OUT"/finetune/full/*/*/; do
  echo "== $run"; adapterbench evaluate "$run"
done
