#!/usr/bin/env bash
# The four model benchmarks at GPU size on one CUDA device; JSON to benchmarks/results/ (and to
# $OUT when set, so a remote runner brings them back).
#
#   1. here (package index reachable):   bash benchmarks/prepare_gpu_suite.sh
#   2. on the GPU machine, repo root:    bash benchmarks/run_gpu_suite.sh
#      (with the lent machine's `run` tool: carry [".gpu_wheels", "benchmarks/data"])
#
# Missing Python packages are installed from .gpu_wheels into .gpu_site (never over the
# machine's own torch or packages: only modules that do not import are installed).
# SUITE="llm_mfu vit_packing optimizer_step vlm_mfu" (default: all) picks benchmarks;
# BENCH_TIMEOUT (seconds, default 540) bounds each one; extra arguments go to every benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh

"$PY" -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), \
'python', sys.version.split()[0])" || { echo "run_gpu_suite: needs a CUDA device"; exit 2; }
gpu_install_missing || exit 2

BATCHES=benchmarks/data/vlm_batches_s4096_p16384.npz
status=0
for bench in ${SUITE:-llm_mfu vit_packing optimizer_step vlm_mfu}; do
  args=("$@")
  if [ "$bench" = vlm_mfu ]; then
    if [ -f "$BATCHES" ]; then args+=(--batches "$BATCHES"); else
      echo "vlm_mfu: $BATCHES missing; trying the loader in-process"; fi
  fi
  echo "=== $bench ${args[*]}"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-540}" "$PY" -m "benchmarks.$bench" "${args[@]}" || {
    echo "=== $bench FAILED (exit $?)"; status=1; }
  echo "=== $bench took $(( $(date +%s) - start )) s"
done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null
fi
exit $status
