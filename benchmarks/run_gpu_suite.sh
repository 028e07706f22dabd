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
PY=${PYTHON:-python3}
SITE="$PWD/.gpu_site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

"$PY" -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), \
'python', sys.version.split()[0])" || { echo "run_gpu_suite: needs a CUDA device"; exit 2; }

missing=()
while read -r req module; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$req")
done < <(sed -n 's/^\([^#[:space:]][^[:space:]]*\)[[:space:]]*#[[:space:]]*\([A-Za-z0-9_.]*\).*/\1 \2/p' \
         benchmarks/gpu_requirements.txt)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing into $SITE: ${missing[*]}"
  [ -d .gpu_wheels ] || { echo "run_gpu_suite: .gpu_wheels/ missing (run prepare_gpu_suite.sh and carry it)"; exit 2; }
  "$PY" -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels --target "$SITE" \
    "${missing[@]}" || exit 2
fi

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
