#!/usr/bin/env bash
# The GPU smoke (benchmarks/gpu_smoke.py: 3 NCCL training steps of the tiny VLM from pre-packed
# batches, then llm_mfu ours vs stock+sdpa; JSON after each stage).
#
#   here, once (energon and the package index work):  bash benchmarks/gpu_smoke.sh --prepare
#     -> benchmarks/data/gpu_smoke/{tiny_vlm_packs.pt,tokenizer.model} (~6 MB) and the
#        megatron-core cp312 wheel in .gpu_wheels/ (2.6 MB); both git-ignored.
#   on the lent GPU machine, with the device tool's `run` (one call; the stages are budgeted at 290 s):
#     command:   bash benchmarks/gpu_smoke.sh
#     carry:     [".gpu_wheels", "benchmarks/data"]
#     timeout_s: 360
#     -> $OUT/gpu_smoke_<device>.json, $OUT/llm_mfu_<device>.json, $OUT/train_log.txt (and the
#        same JSON in benchmarks/results/ there: commit the copies from $OUT).
# Arguments after --prepare (or without it) go to `python -m benchmarks.gpu_smoke` (--cpu,
# --stages, --ablations, --budget-s ...). PYTHON picks the interpreter (default: python3 there,
# .venv/bin/python here when it exists).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TQDM_DISABLE=${TQDM_DISABLE:-1}

if [ "${1:-}" = --prepare ]; then
  shift
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  reqs=$(sed -n 's/^\(megatron-core==[^[:space:]]*\).*/\1/p' benchmarks/gpu_requirements.txt)
  mkdir -p .gpu_wheels
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu_wheels $reqs || exit 2
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m benchmarks.gpu_smoke --prepare "$@" || exit 2
  du -sh .gpu_wheels benchmarks/data
  exit 0
fi

# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
gpu_install_missing || exit 2
exec "$PY" -m benchmarks.gpu_smoke "$@"
