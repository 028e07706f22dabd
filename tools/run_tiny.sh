#!/usr/bin/env bash
# The README's main job: set up the CPU environment, then pretrain the tiny MLA/MoE model on the
# bundled corpus. Extra arguments are config overrides (e.g. train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_cpu.sh
export TORCH_COMPILE_DISABLE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m megatron_vlm.train --recipe tiny_cpu "$@"
