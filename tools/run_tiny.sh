#!/usr/bin/env bash
# The README's main job: set up the CPU environment, then pretrain the tiny K2.5-style VLM (MoonViT-3D
# + Kimi projector + MLA/MoE LLM) on the bundled multimodal corpus (text, images, interleaved
# documents, video) -- ~5 minutes on 2 cores. Leaves runs/tiny_cpu/: checkpoints, metrics.jsonl,
# loss_curve.png. Extra arguments are config overrides (e.g. train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
# One thread per process, as the tests run it (the loader worker takes the other core): the run
# is then bit-reproducible on a given CPU and its numbers are the tests'. Set OMP_NUM_THREADS to
# change it.
export TORCH_COMPILE_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m megatron_vlm.train --recipe tiny_cpu "$@"
echo "vision probes (true vs shuffled vs reversed media): .venv/bin/python tools/vision_probe.py runs/tiny_cpu"
