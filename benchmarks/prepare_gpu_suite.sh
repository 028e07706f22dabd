#!/usr/bin/env bash
# Prepare what travels with the working tree to the lent GPU machine (run HERE, where the package
# index and the multimodal loader work; the GPU machine has neither megatron-core nor energon):
#   .gpu_wheels/                                   wheels of benchmarks/gpu_requirements.txt for
#                                                  CPython 3.12 manylinux x86_64 (~28 MB)
#   benchmarks/data/vlm_batches_s4096_p16384.npz   16 packed micro-batches (S=4096, P=16384) from
#                                                  the real multimodal loader (~3 MB)
# Both paths are git-ignored; pass them as `carry` to the device run (64 MiB in all), then run
# benchmarks/run_gpu_suite.sh there. GPU_PYTHON_VERSION overrides 3.12 (e.g. to test locally).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
DEST=${GPU_WHEELS:-.gpu_wheels}
mkdir -p "$DEST" benchmarks/data
reqs=$(sed -e 's/#.*//' -e '/^\s*$/d' benchmarks/gpu_requirements.txt)
# shellcheck disable=SC2086
pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" $reqs
if [ "${SKIP_VLM_BATCHES:-0}" != 1 ]; then
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m benchmarks.vlm_mfu \
    --dump-batches benchmarks/data/vlm_batches_s4096_p16384.npz
fi
du -sh "$DEST" benchmarks/data
