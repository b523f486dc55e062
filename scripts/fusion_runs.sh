#!/usr/bin/env bash
# AdapterFusion on real data (minilm-l6, seed 42): Pfeiffer adapters for the seven tasks
# (RTE, MRPC, STS-B, CoLA, CB from scripts/core_runs.sh; SST-2 on an 8,000-example
# subsample and SICK here, 5 epochs each), then fusion of all seven on RTE, MRPC and CB
# (lr 5e-5; 3 epochs on RTE/MRPC and 10 on CB instead of 10 everywhere, for CPU time),
# with the attention heatmaps.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/fusion_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs}
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
adapterbench extract --task sst2 --seed 42 --out "$OUT" train.epochs=5 train.limit=8000
adapterbench extract --task sick --seed 42 --out "$OUT" train.epochs=5
for task in rte mrpc stsb cola cb; do  # the same settings as core_runs.sh (reused if done)
  adapterbench extract --task "$task" --seed 42 --out "$OUT" train.epochs=5
done
SRC=()
for task in rte mrpc stsb cola sst2 sick cb; do
  SRC+=("$(ls -d "$OUT"/extract/pfeiffer/$task/minilm-l6-s42-* | head -1)")
done
adapterbench fuse --target cb --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=10
adapterbench fuse --target rte --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=3
adapterbench fuse --target mrpc --adapters "${SRC[@]}" --seed 42 --out "$OUT" --save-attention train.epochs=3
for run in "$OUT"/fuse/fusion/*/*/; do
  echo "== $run"; adapterbench evaluate "$run"
done
