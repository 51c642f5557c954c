#!/usr/bin/env bash
# Proves mtrain's GPU path on one GPU in a few minutes and prints one table:
#   bash scripts/gpu_check.sh            (from the checkout; installs nothing)
# GPU tests, transformer-base training speed in bf16 and fp16 (tokens/s, MFU, peak memory), and a
# 3-minute Multi30k fit + beam-5 translate + score when data/multi30k holds the corpus.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" scripts/gpu_check.py "$@"
