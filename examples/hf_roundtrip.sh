#!/usr/bin/env bash
# Hugging Face round trip: import an HF checkpoint, continue pretraining from it, export the
# result, and load the export in transformers with its tokenizer (offline, no remote code).
#   HF_DIR=/ckpt/Kimi-K2.5 RECIPE=kimi_k25 bash examples/hf_roundtrip.sh data.multimodal.root=...
#   HF_DIR=<an export of a tiny run> SMOKE=1 bash examples/hf_roundtrip.sh   # tiny, 2 steps
# RECIPE must describe the same model as HF_DIR (the import refuses to mix them up).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
: "${HF_DIR:?set HF_DIR to a Hugging Face checkpoint directory}"
RECIPE=${RECIPE:-tiny_cpu}
WORK=${WORK:-runs/example_roundtrip}
STEPS=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  STEPS=(train.steps=2 optim.warmup_steps=1 train.eval_interval=0 train.eval_batches=1
         data.global_batch_size=2 train.plot=false)
fi
echo "== 1. import $HF_DIR"
"$PYTHON" tools/convert_hf.py import "$HF_DIR" "$WORK/imported"
echo "== 2. train from the imported weights ($RECIPE)"
"$PYTHON" -m megatron_vlm.train --recipe "$RECIPE" "train.output_dir=$WORK/run" \
  "checkpoint.init_from=$WORK/imported" "data.tokenizer=$HF_DIR" "${STEPS[@]}" "$@"
echo "== 3. export the newest checkpoint"
"$PYTHON" tools/convert_hf.py export "$WORK/run/checkpoints" "$WORK/exported"
echo "== 4. load the export in transformers"
"$PYTHON" examples/load_in_transformers.py "$WORK/exported"
