#!/usr/bin/env bash
# The fair rerun (configs/studies/reproduce_fair.yaml) in the background, from a snapshot of this
# checkout's HEAD outside the work tree, in ~/studies (resumable: run this again after any
# interruption; a finished run is never trained twice). One thread, so a core stays free.
#   bash scripts/fair_rerun.sh            # start or resume (WORKERS=2: two one-thread workers)
#   adapterbench status reproduce_fair --out ~/studies/reproduce_fair --by-row
#   adapterbench archive ~/studies/reproduce_fair --out docs/results/fair.jsonl   # commit it as data
# If ~/studies was lost, the archive keeps what finished: the script passes --skip-archived.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STUDIES=${ADAPTERBENCH_STUDIES:-$HOME/studies}
mkdir -p "$STUDIES"
if pgrep -f "adapterbench run reproduce_fair" > /dev/null; then   # never swap the code under a worker
  echo "the fair rerun is running already (pgrep -af 'adapterbench run reproduce_fair'); stop it to restart"
  exit 0
fi
rm -rf "$STUDIES/fair-code" && git archive --format=tar --prefix=fair-code/ HEAD | tar -x -C "$STUDIES"
SKIP=()
# always: a folder lost and started anew holds only what ran since, and the archive the rest
[ -s docs/results/fair.jsonl ] && SKIP=(--skip-archived "$ROOT/docs/results/fair.jsonl")
cd "$STUDIES"
export PYTHONPATH="$STUDIES/fair-code" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export ADAPTERBENCH_DATA_DIR=${ADAPTERBENCH_DATA_DIR:-$(cd "$ROOT/../shared/data/glue" && pwd)}
for w in $(seq 1 "${WORKERS:-1}"); do   # workers share the study through its run locks
  log="$STUDIES/reproduce_fair.log"; [ "$w" -gt 1 ] && log="$STUDIES/reproduce_fair.worker$w.log"
  setsid nohup "$ROOT/.venv/bin/python" -m adapterbench run reproduce_fair --out "$STUDIES/reproduce_fair" "${SKIP[@]}" \
    >> "$log" 2>&1 &
  echo "started: tail -f $log"
  sleep 5
done
