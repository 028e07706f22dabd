#!/usr/bin/env bash
# Kimi K2.5 joint pretraining on 128 nodes x 8 H100 through SLURM: checked before it queues
# (layout vs node count, the planner's memory, tokenizer and data set), preempted jobs save and
# requeue themselves. DRY_RUN=1 prints the batch script instead of submitting it.
#   TOKENIZER=/ckpt/Kimi-K2.5 DATA=/lustre/data/k25_shards IMAGE=/lustre/images/mvlm.sqsh \
#     bash examples/slurm_kimi_k25.sh --partition batch --account myproj
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=()
if [[ "${DRY_RUN:-0}" == 1 ]]; then DRY=(--dry-run); fi
exec "$PYTHON" tools/launch.py --recipe kimi_k25 --nodes "${NODES:-128}" --gpus-per-node 8 \
  --time "${TIME:-04:00:00}" --container-image "${IMAGE:-/lustre/images/megatron_vlm.sqsh}" \
  --container-mounts "${MOUNTS:-/lustre:/lustre}" --run-dir "${RUN_DIR:-/lustre/runs/k25}" \
  "${DRY[@]}" "$@" \
  "data.tokenizer=${TOKENIZER:-/lustre/ckpt/Kimi-K2.5}" \
  "data.multimodal.root=${DATA:-/lustre/data/k25_shards}" checkpoint.async_save=true
