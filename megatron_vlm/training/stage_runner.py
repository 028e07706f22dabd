"""Run training stages one after another, each initialised from the previous one's checkpoint
(``tools/run_stages.py``; the stage recipes live in ``recipes/stages.py``).

Stage k+1's ``checkpoint.init_from`` is stage k's checkpoint root and every stage after the first
uses the first stage's tokenizer (a VLM's token ids must mean the same thing in every stage).
Overrides apply to every stage (``train.steps=5``) or, prefixed ``NAME:``, to one stage
(``tiny_stage_long:parallel.cp=2``). Each stage runs with ``checkpoint.resume=auto``: running the
chain again after a crash continues the interrupted stage and skips finished ones (their own
checkpoint wins over ``init_from``) instead of being refused as a second run in their directories.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_vlm.config import JobConfig, apply_overrides
from megatron_vlm.recipes import get_recipe


def stage_jobs(names: Sequence[str], out_dir: str | Path, overrides: Sequence[str] = (),
               init_from: str | None = None) -> list[JobConfig]:
    """The stages' jobs, chained: each writes under ``out_dir/NAME`` and starts from the
    previous one's checkpoints (the first from ``init_from``, or as its recipe says)."""
    out_dir = Path(out_dir)
    unknown = [o.split(":", 1)[0] for o in overrides
               if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] not in names]
    if unknown:
        raise ValueError(f"override for unknown stage(s) {unknown}; stages: {list(names)}")
    jobs, previous = [], init_from
    for name in names:
        mine = [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in overrides
                if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == name]
        chain = [f"train.output_dir={out_dir / name}", "checkpoint.resume=auto"]
        if previous is not None:
            chain.append(f"checkpoint.init_from={previous}")
        jobs.append(apply_overrides(get_recipe(name), [*chain, *mine]))
        previous = str(out_dir / name / "checkpoints")
    return jobs


def _with_tokenizer(job: JobConfig, first: JobConfig) -> JobConfig:
    if job.data.tokenizer or job is first:
        return job
    models = sorted(Path(first.train.output_dir).glob("spm_*.model"))
    tok = first.data.tokenizer or (str(models[0]) if models else None)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer (spm_*.model) in {first.train.output_dir}")
    return apply_overrides(job, [f"data.tokenizer={tok}"])


def run_stages(jobs: list[JobConfig], in_process: bool = False, nproc: int = 1) -> None:
    """Train each job to completion in order: in this process (one process group for all,
    world size 1 only) or each in a fresh ``python -m megatron_vlm.train`` / ``torchrun``."""
    if in_process and nproc != 1:
        raise ValueError("in_process runs need nproc=1 (torchrun starts the ranks)")
    for i, job in enumerate(jobs):
        job = _with_tokenizer(job, jobs[0])
        print(f"=== stage {i + 1}/{len(jobs)}: {job.name} -> {job.train.output_dir}", flush=True)
        out = Path(job.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.yaml").write_text(job.to_yaml())
        if in_process:
            from megatron_vlm.training.trainer import train

            train(job)
            continue
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                     "-m", "megatron_vlm.train"] if nproc > 1
                    else [sys.executable, "-m", "megatron_vlm.train"])
        subprocess.run([*launcher, "--config", str(out / "job.yaml")], check=True)
