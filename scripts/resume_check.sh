#!/usr/bin/env bash
# Resume equality on real data: the same extract run (RTE subsample, minilm-l6, CPU) once
# uninterrupted and once killed with SIGKILL after its checkpoint at step 8, then rerun;
# prints both runs' dev metrics.
#   ADAPTERBENCH_DATA_DIR=../shared/data/glue bash scripts/resume_check.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/resume-check}
export HF_HUB_OFFLINE=1
ARGS=(--task rte --model minilm-l6 --seed 7 train.limit=256 train.eval_limit=128 train.epochs=2 \
      train.batch_size=16 train.lr=1e-3 train.checkpoint_every=4)
adapterbench extract "${ARGS[@]}" --out "$OUT/uninterrupted" > /dev/null
adapterbench extract "${ARGS[@]}" --out "$OUT/killed" > "$OUT.killed.log" 2>&1 &
PID=$!
until ls "$OUT"/killed/extract/pfeiffer/rte/*/checkpoint/step-8-* > /dev/null 2>&1; do sleep 0.5; done
kill -9 $PID; wait $PID 2>/dev/null || true
RUN=$(ls -d "$OUT"/killed/extract/pfeiffer/rte/*/)
echo "killed at: $(grep -o '"step": [0-9]*' "$RUN/log.jsonl" | tail -1); status: $(grep -o '"status": "[a-z]*"' "$RUN/metrics.json")"
adapterbench extract "${ARGS[@]}" --out "$OUT/killed" > /dev/null
for r in "$OUT"/uninterrupted/extract/pfeiffer/rte/*/ "$RUN"; do
  python - "$r" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
print(sys.argv[1], m["status"], m["metrics"]["dev"], "history", m["history"], "steps", m["steps"])
PY
done
