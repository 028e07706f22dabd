"""Run the staged pretraining (a) -> (b) -> (c) -> (d), each stage from the previous checkpoint.

    python tools/run_stages.py --out runs/tiny_stages                       # tiny VLM, 1 process
    python tools/run_stages.py --nproc 2 tiny_stage_long:parallel.cp=2      # (d) with CP=2
    python tools/run_stages.py --init-from runs/import/checkpoints train.steps=50

Overrides apply to every stage, or with a ``STAGE:`` prefix to one. See docs/stages.md.
"""

from __future__ import annotations

import argparse

from megatron_vlm.recipes.stages import TINY_STAGE_ORDER, TINY_STAGES_DIR
from megatron_vlm.training.stage_runner import run_stages, stage_jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=list(TINY_STAGE_ORDER), help="recipes, in order")
    p.add_argument("--out", default=TINY_STAGES_DIR, help="each stage writes OUT/<stage>")
    p.add_argument("--init-from", default=None, help="checkpoint the first stage starts from")
    p.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun if > 1)")
    p.add_argument("--in-process", action="store_true", help="all stages in this process")
    p.add_argument("overrides", nargs="*", help="[STAGE:]section.field=value")
    args = p.parse_args(argv)
    jobs = stage_jobs(args.stages, args.out, args.overrides, init_from=args.init_from)
    run_stages(jobs, in_process=args.in_process, nproc=args.nproc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
