#!/usr/bin/env bash
# The performance benchmark, ours and the `adapters` library (peer) side by side, each
# measurement in its own process. Needs .peer-venv (bash scripts/make_peer_venv.sh) and the data.
#   1. fixed shape 32 x 128 tokens, every method, training and inference
#   2. real RTE training batches (dynamic padding) for the single-task methods and fusion
#   3. one whole epoch of a Pfeiffer adapter on MRPC: ours (padded to each batch's longest
#      member) against the peer padded to 128 tokens, as its GLUE example script does
# Writes $OUT/{fixed,rte,mrpc-epoch}/bench.{md,json}; docs/performance.md quotes them.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/bench.sh [OUT]
set -euo pipefail
OUT=${1:-runs/bench}
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
adapterbench bench --configs all --peer --out "$OUT/fixed"
adapterbench bench --configs bare,full,pfeiffer,houlsby,fusion8 --task rte --peer --out "$OUT/rte"
adapterbench bench --configs pfeiffer --modes train --task mrpc --steps 0 --warmup 1 --peer --peer-pad-to-max \
  --out "$OUT/mrpc-epoch"
# the adapter step and the peer, median of 3 interleaved repeats; then our bf16 autocast on CPU
adapterbench bench --configs bare,pfeiffer --peer --repeat 3 --out "$OUT/fixed-repeat"
adapterbench bench --configs bare,pfeiffer --precision bf16 --repeat 3 --out "$OUT/fixed-bf16"
# one MRPC epoch again, ours in length-grouped order (train.group_by_length=true)
adapterbench bench --configs pfeiffer --modes train --task mrpc --steps 0 --warmup 1 --group-by-length --peer \
  --peer-pad-to-max --out "$OUT/mrpc-epoch-grouped"
