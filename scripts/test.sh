#!/usr/bin/env bash
# The test command: unit tests on tiny in-memory models, plus the real-data integration
# tests when ADAPTERBENCH_DATA_DIR points at a glue_data folder (../shared/data/glue here).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -z "${ADAPTERBENCH_DATA_DIR:-}" ] && [ -d ../shared/data/glue ]; then
  export ADAPTERBENCH_DATA_DIR="$(cd ../shared/data/glue && pwd)"
fi
exec .venv/bin/python -m pytest -q "$@"
