"""Build this rank's model chunks and wrap them in megatron-core DDP."""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.config.job import JobConfig
from megatron_vlm.families import get_family
from megatron_vlm.models.gpu_settings import DDPChoice, choose_ddp
from megatron_vlm.models.llm import build_llm
from megatron_vlm.models.specs import detect_capabilities
from megatron_vlm.parallel.runtime import Runtime, groups_or_default
from megatron_vlm.training.telemetry import FinalizeWithTelemetry

logger = logging.getLogger(__name__)


def ddp_choice(job: JobConfig) -> DDPChoice:
    """The DDP settings of ``job`` on this machine (``parallel.overlap_*``, by capability)."""
    model = job.model
    return choose_ddp(job.parallel, detect_capabilities(model.kernels),
                      muon=job.optim.optimizer == "muon",
                      tower_trainable=model.is_vlm and not (model.freeze_vision
                                                            and model.freeze_projector))


def ddp_config(choice: DDPChoice) -> DistributedDataParallelConfig:
    """megatron's DDP config for ``choice``."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=choice.overlap_grad_reduce,
        overlap_param_gather=choice.overlap_param_gather,
        use_distributed_optimizer=choice.use_distributed_optimizer,
        # The trainer skips non-finite steps itself, all ranks agreeing.
        check_for_nan_in_grad=False,
        bucket_size=choice.bucket_size,
    )


def build_model_chunks(job: JobConfig, wrap_ddp: bool = True,
                       runtime: Runtime | None = None) -> list[MegatronModule]:
    """This rank's model chunk(s) (one per virtual pipeline stage), optionally DDP-wrapped.

    Built and wrapped on ``runtime``'s process groups with its kernel choice (None: the groups
    ``init_distributed`` made, ``parallel.runtime.groups_or_default``, and the choice resolved
    from ``job.model``). The megatron ``TransformerConfig`` of each chunk is told how to
    finalise gradients (DP all-reduce, expert-bias update, per-token loss scaling) and how to
    sync under gradient accumulation -- the hooks megatron's pipeline schedules call.
    """
    # Overlaps, bucket size and the reduce-scatter for megatron's flat ZeRO optimizer (not with
    # Muon, whose layer-wise sharding needs whole gradients: SPEC §2, Megatron-LM #2164) are
    # decided in models/gpu_settings.py, before building: a setting it refuses fails fast.
    ddp = ddp_choice(job) if wrap_ddp else None
    pgs = runtime.pg_collection if runtime is not None else groups_or_default(required=True)
    choice = runtime.kernels if runtime is not None else None
    pp_rank, pp_size = pgs.pp.rank(), pgs.pp.size()
    vpp = job.parallel.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        first = pp_rank == 0 and vp_stage == 0
        last = pp_rank == pp_size - 1 and vp_stage == vpp - 1
        vp = vp_stage if job.parallel.vpp else None
        if job.model.is_vlm:
            model = get_family(job.model.family).build_vlm(
                job.model, job.parallel, pre_process=first, post_process=last, vp_stage=vp,
                pg_collection=pgs, choice=choice)
        else:
            model = build_llm(job.model.llm, job.parallel, job.model.params_dtype,
                              pre_process=first, post_process=last, vp_stage=vp,
                              pg_collection=pgs, kernels=job.model.kernels, choice=choice)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if not wrap_ddp:
        return chunks
    logger.info("data-parallel: %s", ddp.describe())
    config = ddp_config(ddp)
    wrapped = [
        DistributedDataParallel(config=m.config, ddp_config=config, module=m,
                                disable_bucketing=(i > 0), pg_collection=pgs)
        for i, m in enumerate(chunks)
    ]
    # Set once, here: megatron's finalize_model_grads (DP all-reduce, expert-bias update,
    # per-token loss scaling) preceded by the MoE load record the trainer logs; megatron's
    # schedules pass their groups, a direct call gets ours.
    finalize = FinalizeWithTelemetry(wrapped, pgs)
    for m in wrapped:
        cfg = m.config
        cfg.finalize_model_grads_func = finalize
        cfg.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        cfg.grad_sync_func = None
        cfg.param_sync_func = None
    return wrapped


def unwrap(model: MegatronModule) -> MegatronModule:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
