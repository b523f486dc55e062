#!/usr/bin/env bash
# A shipped study in the background, from a snapshot of this checkout's HEAD outside the work
# tree, in ~/studies (resumable: run this again after any interruption; a finished run is never
# trained twice, and what the archive holds is skipped, so a lost ~/studies retrains only what
# the archive lacks). One thread per worker, so the workers share the cores.
#   bash scripts/study_in_background.sh reproduce_fair docs/results/fair.jsonl   # WORKERS=2: two workers
#   bash scripts/study_in_background.sh reproduce_base docs/results/base.jsonl
#   adapterbench status reproduce_fair --out ~/studies/reproduce_fair --archive docs/results/fair.jsonl --by-row
#   adapterbench archive ~/studies/reproduce_fair --out docs/results/fair.jsonl   # commit it as data
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash scripts/study_in_background.sh STUDY ARCHIVE (e.g. reproduce_fair docs/results/fair.jsonl)"; exit 2; }
STUDY=$1 ARCHIVE=$2
cd "$(dirname "$0")/.."
ROOT=$(pwd)
[ -f "adapterbench/configs/studies/$STUDY.yaml" ] || { echo "no shipped study '$STUDY' (adapterbench/configs/studies/)"; exit 2; }
[ -x .venv/bin/python ] || { echo "no .venv here: run bash scripts/setup.sh first"; exit 2; }
STUDIES=${ADAPTERBENCH_STUDIES:-$HOME/studies}
mkdir -p "$STUDIES"
if pgrep -f "adapterbench run $STUDY " > /dev/null; then   # never swap the code under a worker
  echo "$STUDY is running already (pgrep -af 'adapterbench run $STUDY'); stop it (kill -TERM: it checkpoints) to restart"
  exit 0
fi
CODE="$STUDIES/code-$STUDY"
rm -rf "$CODE" && mkdir -p "$CODE" && git archive --format=tar HEAD | tar -x -C "$CODE"
SKIP=()      # always: a study folder lost and started anew holds only what ran since, the archive the rest
[ -s "$ARCHIVE" ] && SKIP=(--skip-archived "$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")")
cd "$STUDIES"
export PYTHONPATH="$CODE" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export ADAPTERBENCH_DATA_DIR=${ADAPTERBENCH_DATA_DIR:-$(cd "$ROOT/../shared/data/glue" && pwd)}
for w in $(seq 1 "${WORKERS:-1}"); do   # workers share the study through its run locks
  log="$STUDIES/$STUDY.log"; [ "$w" -gt 1 ] && log="$STUDIES/$STUDY.worker$w.log"
  setsid nohup "$ROOT/.venv/bin/python" -m adapterbench run "$STUDY" --out "$STUDIES/$STUDY" "${SKIP[@]}" \
    >> "$log" 2>&1 &
  echo "started: tail -f $log"
  sleep 5
done
