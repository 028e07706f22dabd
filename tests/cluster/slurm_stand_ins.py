"""Stand-ins for ``srun``, ``scontrol``, ``scancel`` and ``sbatch`` on PATH, so a rendered batch
script runs for real on this machine (``fake_slurm`` fixture in ``conftest.py``).

* ``srun`` records and drops its own options, then runs the task command line here
  (``FAKE_SRUN_PRINT=1``: only records it in ``srun_task``).
* ``scontrol show hostnames`` prints ``FAKE_HOSTS``; ``scontrol requeue ID`` records ID in
  ``requeued``.
* ``scancel --signal=SIG`` records its arguments and signals what ``srun`` started.
* ``sbatch`` records its arguments, copies the script to ``submitted.sbatch``, records whether
  the directory of the script's ``#SBATCH --output`` existed at submission
  (``output_dir_at_submit``: ``exists``/``missing``) and prints ``777;cluster``.
"""

from __future__ import annotations

import os
from pathlib import Path

FAKES = {
    "srun": r"""#!/usr/bin/env bash
opts=()
while [[ $# -gt 0 && $1 == --* ]]; do opts+=("$1"); shift; done
printf '%s\n' "${opts[@]}" > "$FAKE_SLURM/srun_options"
if [[ "${FAKE_SRUN_PRINT:-0}" == 1 ]]; then printf '%s\n' "$@" > "$FAKE_SLURM/srun_task"; exit 0; fi
echo $$ >> "$FAKE_SLURM/srun_pids"
exec "$@"
""",
    "scontrol": r"""#!/usr/bin/env bash
case "$1" in
  show) printf '%s\n' ${FAKE_HOSTS:-localhost} ;;
  requeue) echo "$2" >> "$FAKE_SLURM/requeued" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
""",
    "scancel": r"""#!/usr/bin/env bash
sig=${1#--signal=}
echo "$*" >> "$FAKE_SLURM/scancel"
for pid in $(cat "$FAKE_SLURM/srun_pids"); do kill -s "$sig" "$pid" 2>/dev/null; done
""",
    "sbatch": r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM/sbatch_calls"
script="${@: -1}"
cp "$script" "$FAKE_SLURM/submitted.sbatch"
out=$(sed -n 's/^#SBATCH --output=//p' "$script")
if [[ -d "$(dirname "$out")" ]]; then echo exists; else echo missing; fi \
  > "$FAKE_SLURM/output_dir_at_submit"
echo "777;cluster"
""",
}


def install(root: Path) -> Path:
    """Write the stand-ins to ``root/bin`` (prepend it to PATH); returns ``root``."""
    (root / "bin").mkdir(parents=True)
    for name, text in FAKES.items():
        path = root / "bin" / name
        path.write_text(text)
        path.chmod(0o755)
    return root


def slurm_env(fake: Path, **extra: str) -> dict[str, str]:
    """This process's environment with the stand-ins first on PATH (no inherited MASTER_PORT)."""
    env = dict(os.environ, PATH=f"{fake / 'bin'}:{os.environ['PATH']}", FAKE_SLURM=str(fake),
               TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env
