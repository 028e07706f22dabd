"""The start-up banner: what a run is about to do, printed once by rank 0 before the first step.

Parameters (total and activated per token, from the closed form checked against meta-device
builds), the parallel layout, the kernels chosen, the tokenizer, the datasets and their mix, the
output and checkpoint directories, the resume point and the CPU threads per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_vlm.config.job import JobConfig
from megatron_vlm.families import family_costs
from megatron_vlm.models.param_count import count_llm_params_closed_form


def _count(n: int) -> str:
    """1026408209408 -> '1.03T', 32_900_000_000 -> '32.9B', 4_000_000 -> '4.00M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class ParamSummary:
    """Parameter counts of the whole (unsharded) model."""

    llm_total: int
    llm_active: int
    vision: int
    projector: int

    @property
    def total(self) -> int:
        return self.llm_total + self.vision + self.projector

    @property
    def active(self) -> int:
        """Per token: the LLM's activated parameters plus every vision/projector parameter."""
        return self.llm_active + self.vision + self.projector


def param_summary(job: JobConfig) -> ParamSummary:
    """Closed-form counts (``models/param_count.py``; the planner's tensor list for the ViT)."""
    llm = count_llm_params_closed_form(job.model.llm, tp=job.parallel.tp)
    vision = projector = 0
    if job.model.is_vlm:
        costs = family_costs(job.model.family)
        for t in costs.vision_tensors(job.model.vision, job.model.projector, "fp32", tp=1):
            if t.name.startswith("projector."):
                projector += t.numel
            else:
                vision += t.numel
    return ParamSummary(llm["total"], llm["activated"], vision, projector)


def startup_banner(
    job: JobConfig,
    *,
    world_size: int,
    dp_size: int,
    kernels: str,
    tokenizer: str,
    data_lines: list[str],
    checkpoint_root: Path,
    resume_from: Path | None,
    resume_step: int,
    threads: int,
) -> list[str]:
    """The banner's lines (rank 0 prints them)."""
    p = param_summary(job)
    par = job.parallel
    parts = [f"LLM {_count(p.llm_total)} ({_count(p.llm_active)} active)"]
    if job.model.is_vlm:
        parts += [f"vision {_count(p.vision)}", f"projector {_count(p.projector)}"]
    frozen = [name for name, on in (("vision", job.model.freeze_vision),
                                    ("projector", job.model.freeze_projector),
                                    ("llm", job.model.freeze_llm)) if on]
    lines = [
        f"=== {job.name}: {job.train.steps:,} steps x {job.data.global_batch_size:,} packs of "
        f"{job.data.seq_length:,} tokens ({job.data.global_batch_size * job.data.seq_length:,} "
        "tokens/step)",
        f"params: {p.total:,} total ({_count(p.total)}), {p.active:,} active per token "
        f"({_count(p.active)}): " + ", ".join(parts)
        + (f"; frozen: {', '.join(frozen)}" if frozen else ""),
        f"layout: world {world_size} = tp {par.tp} x pp {par.pp} x cp {par.cp} x dp {dp_size}"
        f" (ep {par.ep}, etp {par.expert_tp}, sp {'on' if par.sequence_parallel else 'off'}, "
        f"{'distributed' if par.use_distributed_optimizer else 'replicated'} optimizer), "
        f"{job.model.params_dtype}, {job.optim.optimizer} lr {job.optim.lr:g} "
        f"({job.optim.schedule})",
        f"kernels: {kernels}",
        f"tokenizer: {tokenizer}",
        *data_lines,
        f"output: {Path(job.train.output_dir).resolve()} (checkpoints "
        f"{checkpoint_root.resolve()}, every {job.checkpoint.save_interval or 'end'}"
        f"{', async' if job.checkpoint.async_save else ''})",
        (f"resume: {resume_from} at step {resume_step}" if resume_from is not None
         else "resume: none, starting at step 0"
         + (f" from the weights of {job.checkpoint.init_from}" if job.checkpoint.init_from
            else "")),
        f"threads: {threads} per rank (torch intra-op; train.cpu_threads / OMP_NUM_THREADS)",
    ]
    return lines
