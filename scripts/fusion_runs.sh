#!/usr/bin/env bash
# AdapterFusion on real data (minilm-l6, seed 42): Pfeiffer adapters for seven tasks
# (RTE, MRPC, STS-B, CoLA, CB as in scripts/core_runs.sh and reused from it; SST-2 and
# SICK here, same settings: 2,000-example subsample, 3 epochs, lr 1e-4), then fusion of
# all seven on RTE, MRPC and CB (lr 5e-5; 2 epochs on the 2,000-example RTE/MRPC subsample
# and 10 on CB, instead of up to 10 everywhere, for CPU time), with attention heatmaps.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/fusion_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs}
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
for task in sst2 sick rte mrpc stsb cola cb; do  # finished runs with the same config are reused
  adapterbench extract --task "$task" --model minilm-l6 --seed 42 --out "$OUT" train.epochs=3 train.limit=2000
done
SRC=()
for task in rte mrpc stsb cola sst2 sick cb; do
  SRC+=("$(ls -d "$OUT"/extract/pfeiffer/$task/minilm-l6-s42-* | head -1)")
done
adapterbench fuse --target cb --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=10
adapterbench fuse --target rte --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=2 train.limit=2000
adapterbench fuse --target mrpc --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=2 train.limit=2000
for run in "$OUT"/fuse/fusion/*/*/; do
  echo "== $run"; adapterbench evaluate "$run"
done
