#!/usr/bin/env bash
# Multi-task baselines on real data (minilm-l6, seed 42): mtl, mt-a and camtl (MT-Uncertainty
# sampling) on RTE, MRPC, STS-B, CoLA and SST-2, each task subsampled to 200 training
# examples and 200 dev examples for CPU time, 2 epochs, lr 1e-4 wherever the encoder trains;
# beside single-task full fine-tuning (lr 1e-4) and Pfeiffer (lr 1e-3) with the same data,
# seed and epochs; then the report table.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/multitask_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/multitask-check}
export HF_HUB_OFFLINE=1
COMMON=(--model minilm-l6 --seed 42 --out "$OUT" train.limit=200 train.eval_limit=200 train.epochs=2)
for m in mtl mt-a camtl; do
  adapterbench multitask --tasks rte,mrpc,stsb,cola,sst2 --method $m --sampling uncertainty "${COMMON[@]}" \
    train.lr=1e-4
done
for t in rte mrpc stsb cola sst2; do
  adapterbench finetune --task $t "${COMMON[@]}" train.lr=1e-4
  adapterbench extract --task $t "${COMMON[@]}" train.lr=1e-3
done
adapterbench report "$OUT" --out "$OUT/report.md"
