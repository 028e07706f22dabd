#!/usr/bin/env bash
# The README's test command: set up the CPU environment, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
.venv/bin/ruff check .
export TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest tests -q --durations=30 "$@"
