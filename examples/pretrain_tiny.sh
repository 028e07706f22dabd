#!/usr/bin/env bash
# Tiny K2.5-style VLM pretraining on the bundled corpus (the README's main job, on CPU).
#   bash examples/pretrain_tiny.sh                               # runs/example_tiny, 600 steps
#   OUT=runs/x bash examples/pretrain_tiny.sh train.steps=50      # any dotted overrides
#   SMOKE=1 bash examples/pretrain_tiny.sh                        # a few steps
# Then: python tools/vision_probe.py "$OUT" (does the model read pixels and frame order?).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/example_tiny}
SMOKE_ARGS=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  SMOKE_ARGS=(train.steps=3 optim.warmup_steps=1 train.eval_interval=0 train.eval_batches=1
              data.global_batch_size=2 train.plot=false)
fi
exec "$PYTHON" -m megatron_vlm.train --recipe tiny_cpu "train.output_dir=$OUT" \
  "${SMOKE_ARGS[@]}" "$@"
