#!/usr/bin/env bash
# Make .venv (when missing), install mtrain with its test tools (the dev extra), lint, run the tests.
#   scripts/test.sh [--torch auto|cpu|cuda] [PYTEST_OPTIONS]     e.g. scripts/test.sh -x tests/test_model.py
# About 12 minutes on 2 CPU cores (installing included). The serve page's test drives Debian's chromium with its
# chromedriver (sudo apt install chromium chromium-driver) and is skipped without them; the GPU tests
# are skipped without CUDA (scripts/gpu_check.sh runs them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_choice=auto
if [ "${1:-}" = --torch ]; then torch_choice="${2:?--torch needs auto, cpu or cuda}"; shift 2; fi
. scripts/install.sh --torch "$torch_choice" --extras dev
echo "== lint"
ruff check .
echo "== tests"
python -m pytest -q "$@"
