"""CLI: ``python -m megatron_vlm.train --recipe tiny_cpu train.steps=20 parallel.tp=2``.

Runs under ``torchrun`` for several processes, or as a plain single process.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain a megatron_vlm model.",
        epilog="Overrides are dotted config paths: train.steps=20 optim.lr=1e-3 parallel.tp=2",
    )
    parser.add_argument("--recipe", default="tiny_cpu", help="recipe name (default: tiny_cpu)")
    parser.add_argument("--config", default=None, help="YAML saved by a previous run (job.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the newest complete checkpoint (checkpoint.resume=true)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace):
    from megatron_vlm.config import apply_overrides, load_yaml
    from megatron_vlm.recipes import get_recipe

    job = load_yaml(args.config) if args.config else get_recipe(args.recipe)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=true")
    return apply_overrides(job, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = build_job(args)
    except ValueError as err:  # config errors: one clear line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(job.to_yaml())
        return 0
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    # Without TE/Apex (the CPU path) megatron-core warns at import that it falls back to torch:
    # expected (SPEC §6), and one line per module per rank buries the progress output.
    warnings.filterwarnings("ignore", message=r".*not installed.*[Ff]all(ing)? back.*")
    from megatron_vlm.training.trainer import train

    out = Path(job.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":
        (out / "job.yaml").write_text(job.to_yaml())
    result = train(job)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {result.state.step}, valid loss {result.final_valid_loss}, "
              f"checkpoint {result.checkpoint}, plot {out / 'loss_curve.png'}")
    from megatron_vlm.parallel.init import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
