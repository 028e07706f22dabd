# Sourced (from the repository root) by the scripts that run on the lent GPU machine: sets PY and
# PYTHONPATH (the repository, then .gpu_site) and installs into .gpu_site, from the carried
# .gpu_wheels/, each requirement of benchmarks/gpu_requirements.txt whose module does not import
# (never over the machine's own torch or packages). Returns 2 when a needed wheel is missing.
PY=${PYTHON:-python3}
SITE="$PWD/.gpu_site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

gpu_install_missing() {
  local missing=() req module
  while read -r req module; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("$req")
  done < <(sed -n 's/^\([^#[:space:]][^[:space:]]*\)[[:space:]]*#[[:space:]]*\([A-Za-z0-9_.]*\).*/\1 \2/p' \
           benchmarks/gpu_requirements.txt)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing into $SITE: ${missing[*]}"
  [ -d .gpu_wheels ] || { echo ".gpu_wheels/ missing (run the prepare step here and carry it)"; return 2; }
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --find-links .gpu_wheels \
    --target "$SITE" "${missing[@]}" || return 2
}
