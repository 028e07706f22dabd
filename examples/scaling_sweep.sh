#!/usr/bin/env bash
# A scaling experiment: K2.5's early-fusion question on the tiny VLM (10:90 vision:text from step
# 0 vs 50:50 over the last 20% of steps) at four token budgets, fitted and plotted
# (docs/scaling.md; ~20 min on 2 cores). SMOKE=1: the sweep file's smoke section, in-process.
#   bash examples/scaling_sweep.sh                 # runs/example_sweep/{table.json,*.png}
#   SWEEP=my_sweep.yaml bash examples/scaling_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SWEEP=${SWEEP:-tools/scaling/sweeps/early_fusion_tiny.yaml}
ARGS=(run "$SWEEP" --output-dir "${OUT:-runs/example_sweep}")
if [[ "${SMOKE:-0}" == 1 ]]; then ARGS+=(--smoke --in-process); fi
exec "$PYTHON" -m tools.scaling "${ARGS[@]}" "$@"
