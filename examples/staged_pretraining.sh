#!/usr/bin/env bash
# Staged pretraining (a) vision alignment -> (b) projector -> (c) joint early fusion -> (d) long
# context with YaRN, each stage from the previous one's checkpoint (docs/stages.md).
#   bash examples/staged_pretraining.sh                          # the tiny VLM, all four stages
#   INIT_FROM=runs/import/checkpoints bash examples/staged_pretraining.sh   # from an HF import
#   SMOKE=1 INIT_FROM=<a tiny run's checkpoints> bash examples/staged_pretraining.sh  # (c), 2 steps
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/example_stages}
ARGS=(--out "$OUT")
if [[ -n "${INIT_FROM:-}" ]]; then ARGS+=(--init-from "$INIT_FROM"); fi
if [[ "${SMOKE:-0}" == 1 ]]; then
  ARGS+=(--stages tiny_stage_joint --in-process train.steps=2 optim.warmup_steps=1
         train.eval_interval=0 train.eval_batches=1 data.global_batch_size=2 train.plot=false)
fi
exec "$PYTHON" tools/run_stages.py "${ARGS[@]}" "$@"
