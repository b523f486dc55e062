#!/usr/bin/env bash
# Create .venv and install adapterbench with its test extras. torch==2.13.0 goes first:
# an unpinned torch would pull several GB of CUDA packages.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
echo "ready: . .venv/bin/activate"
