#!/usr/bin/env bash
# CPU environment for megatron_vlm: a venv in .venv with torch pinned to the CPU build.
# Idempotent: re-running only installs what is missing. Never installs torchvision, nor the
# unrelated PyPI web toolkit that shares NVIDIA Apex's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -c constraints-cpu.txt -e ".[test]"
python -c "import torch, megatron.core; print(f'torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
