#!/usr/bin/env bash
# The 1,000-example reproduction study (configs/studies/reproduce_minilm.yaml), then docs/results-1k.md: its
# tables, plots (docs/results-1k/*.png) and a verdict per paper claim, all written by
# `adapterbench report --claims configs/claims/reproduce_minilm.yaml` from the study's runs.
# The study resumes after any interruption: run this again to go on. Several workers share it
# on a machine with 2+ cores: WORKERS=2 (each gets OMP_NUM_THREADS=1 unless set).
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/reproduce.sh
set -euo pipefail
: "${ADAPTERBENCH_DATA_DIR:?set ADAPTERBENCH_DATA_DIR to a glue_data folder}"
export HF_HUB_OFFLINE=1
STUDY=configs/studies/reproduce_minilm.yaml
AB=adapterbench; command -v adapterbench >/dev/null || AB=.venv/bin/adapterbench   # activated or not
WORKERS=${WORKERS:-1}
mkdir -p runs
if [ "$WORKERS" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  for i in $(seq 0 $((WORKERS - 1))); do
    $AB run "$STUDY" > "runs/reproduce_w$i.log" 2>&1 &   # runs are claimed by lock files
  done
  wait || true
  echo "workers done (logs: runs/reproduce_w*.log)"
else
  $AB run "$STUDY" || echo "some runs failed: see the study's output; the report follows"
fi
$AB report runs/reproduce_minilm --claims configs/claims/reproduce_minilm.yaml --out docs/results-1k.md
