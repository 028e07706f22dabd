"""Process-group setup: torch.distributed (gloo|nccl) and megatron-core's model-parallel groups,
handed out as one :class:`~megatron_vlm.parallel.runtime.Runtime`."""

from __future__ import annotations

import datetime
import os
import random
import socket
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.parallel.cpu_shims import apply_cpu_shims, remove_cpu_shims
from megatron_vlm.parallel.runtime import Runtime, compute_device
from megatron_vlm.parallel.vision_split import forget_groups

if TYPE_CHECKING:
    from megatron_vlm.config.model import ModelConfig


def free_port() -> int:
    """A free TCP port on localhost (for single-process and test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int, timeout_s: int = 600, *,
                     model: ModelConfig | None = None) -> Runtime:
    """Initialise torch.distributed and megatron's groups; returns this process's
    :class:`~megatron_vlm.parallel.runtime.Runtime` (``runtime.dp_size`` is the data-parallel
    size this function used to return).

    Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and as a plain single
    process (world size 1 on a free localhost port). Groups an earlier call made are kept.

    Args:
        parallel: the layout.
        seed: the job seed every generator starts from.
        timeout_s: collective timeout.
        model: the model to be built; given, the runtime carries its kernel choice
            (``models.vlm.kernel_choice``, resolved once on this machine).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    apply_cpu_shims()
    if not dist.is_initialized():
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        device_id = None
        if torch.cuda.is_available():
            # One GPU per rank whatever the backend: LOCAL_RANK modulo the visible devices (a
            # launcher that gives each task one GPU shows it as cuda:0).
            local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            if backend == "nccl":  # binds the communicator to it (eager NCCL init)
                device_id = torch.device("cuda", local)
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:  # torchrun / srun: the launcher's rendezvous
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
        else:
            # One plain process: a private localhost store, and nothing written to os.environ --
            # exported MASTER_PORT/RANK/WORLD_SIZE would leak into every subprocess this process
            # starts later (a torchrun-less child would then try to bind our port).
            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
    world = dist.get_world_size()
    parallel.data_parallel_size(world)  # refuses a layout the world size cannot take
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp,
        )
    # Every generator a run may touch starts from the job seed, so runs are reproducible and a
    # resumed run's restored RNG states equal an uninterrupted run's.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return _runtime(parallel, model)


def _runtime(parallel: ParallelConfig, model: ModelConfig | None) -> Runtime:
    """The :class:`Runtime` of the groups megatron holds now."""
    from megatron.core import parallel_state

    kernels = None
    if model is not None:
        from megatron_vlm.models.vlm import kernel_choice  # models build on parallel/, not back

        kernels = kernel_choice(model, parallel)
    return Runtime(parallel=parallel, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                   device=compute_device(), rank=dist.get_rank(), world_size=dist.get_world_size(),
                   vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
                   kernels=kernels)


def ensure_single_process_groups(seed: int = 1234) -> Runtime:
    """World-size-1 groups (TP = PP = CP = EP = 1) for one process (tests, tools).

    Groups an earlier caller made are reused as they are when they are that layout (only the
    start-up shims are re-applied, nothing is reseeded); groups of another layout (a test that
    built some) are torn down and made again, so a caller never depends on what ran before it.
    More than one process is refused.
    """
    from megatron.core import parallel_state

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"ensure_single_process_groups runs in one process; the default group "
                           f"has {dist.get_world_size()} ranks")
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_virtual_pipeline_model_parallel_world_size())
        if dist.is_initialized() and sizes == (1, 1, 1, 1, None):
            apply_cpu_shims()
            return _runtime(ParallelConfig(), None)
        parallel_state.destroy_model_parallel()
    return init_distributed(ParallelConfig(), seed=seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group, and put back every symbol
    the start-up shims rebound (the next :func:`init_distributed` installs them again)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    forget_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
    remove_cpu_shims()
