#!/usr/bin/env bash
# Make .venv (when missing) and install PyTorch and mtrain into it; safe to run again.
#   scripts/install.sh [--torch auto|cpu|cuda] [--extras dev,serve,...] [--force]
# --torch auto (the default) installs the CUDA build where `nvidia-smi -L` lists an NVIDIA GPU (Linux),
# and the CPU-only build otherwise (a few hundred MB instead of several GB of CUDA libraries); macOS
# gets PyPI's build, which is CPU (and Apple's MPS). A torch already in .venv is kept unless --force.
# Sourced by scripts/quickstart.sh and scripts/test.sh, which leave .venv active.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_choice=auto extras="" force=0
torch_pin="torch==2.13.0"   # the release mtrain is tested with (it needs >= 2.10)
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch_choice="${2:?--torch needs auto, cpu or cuda}"; shift 2 ;;
    --extras) extras="${2:?--extras needs a list such as dev or serve,plot}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$torch_choice" in auto|cpu|cuda) ;; *) echo "install.sh: --torch $torch_choice: expected auto, cpu or cuda" >&2; exit 2 ;; esac

python=python3
command -v "$python" >/dev/null || { echo "install.sh: python3 not found; install Python >= 3.10 first" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "install.sh: mtrain needs Python >= 3.10, found $("$python" -V 2>&1)" >&2; exit 1; }
if [ ! -x "$root/.venv/bin/python" ]; then
  # Debian and Ubuntu ship venv's pip bootstrap separately
  "$python" -m venv "$root/.venv" 2>/dev/null || { rm -rf "$root/.venv"
    echo "install.sh: python3 -m venv failed; on Debian/Ubuntu: sudo apt install python3-venv" >&2; exit 1; }
  echo "install.sh: made $root/.venv"
fi
. "$root/.venv/bin/activate"

if [ "$force" = 1 ] || ! python -c 'import torch' 2>/dev/null; then
  if [ "$torch_choice" = auto ]; then
    if [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
      torch_choice=cuda
    else
      torch_choice=cpu
    fi
  fi
  echo "install.sh: installing PyTorch ($torch_choice build; --torch cpu|cuda chooses)"
  python -m pip install -q --upgrade pip
  # What the configured index gives: PyPI's Linux wheel is the CUDA build; a local wheelhouse or macOS
  # may give a CPU build already.
  plain="$(python -m pip install --dry-run --no-deps --ignore-installed -q --report - "$torch_pin" 2>/dev/null \
    | python -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null || true)"
  if [ "$torch_choice" = cuda ] || [ "$(uname -s)" = Darwin ] || [[ "$plain" == *+cpu ]]; then
    python -m pip install -q "$torch_pin"
  else
    # The CPU-only wheels; an extra index (not --index-url), so that the other packages come from PyPI.
    python -m pip install -q "$torch_pin" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
spec="$root"
[ -z "$extras" ] || spec="$root[$extras]"
echo "install.sh: installing mtrain${extras:+ with $extras}"
python -m pip install -q -e "$spec"
python -m mtrain --version
