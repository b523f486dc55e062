#!/usr/bin/env bash
# The core-pipeline check on real data: a Pfeiffer adapter (paper settings: rf 16, ReLU,
# lr 1e-4; epochs capped at 5 instead of 30 for CPU time) and full fine-tuning (3 epochs,
# lr 2e-5) on RTE, MRPC, STS-B, CoLA and CB with minilm-l6, seed 42, then `evaluate` on each.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/core_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs}
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
for task in cb cola stsb mrpc rte; do
  adapterbench extract --task "$task" --model minilm-l6 --seed 42 --out "$OUT" train.epochs=5
  adapterbench finetune --task "$task" --model minilm-l6 --seed 42 --out "$OUT" train.save_model=true
done
for run in "$OUT"/extract/pfeiffer/*/*/ "$OUT"/finetune/full/*/*/; do
  echo "== $run"; adapterbench evaluate "$run"
done
