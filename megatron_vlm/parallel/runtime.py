"""The runtime a process trains in: its process groups, device and kernel choice, in one object.

:func:`~megatron_vlm.parallel.init.init_distributed` builds one :class:`Runtime`; ``training/``
hands it (or its ``pg_collection``, megatron-core's ``ProcessGroupCollection``) to every
component that communicates: the model builders (``GPTModel``, MoonViT, the projector, our core
attention), megatron's DDP, the optimizer, ``finalize_model_grads``, the pipeline schedule,
QK-Clip and the checkpoint layout. No module in ``models/``, ``optim/``, ``checkpoint/``,
``data/`` or ``convert/`` reads megatron's ``parallel_state`` (``tests/unit/
test_no_parallel_state.py`` scans the source).

Functions those modules offer to tests and tools keep a ``pg_collection=None`` (``layout=None``)
default. :func:`groups_or_default` and :func:`layout_or_default` are the one place such a ``None``
is resolved: the groups ``init_distributed`` made in this process (megatron's own convention for
``pg_collection=None``, so a direct call behaves as it always did), or no groups at all when
torch.distributed is not up (one process: nothing to reduce).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_vlm.config.parallel import ParallelConfig

if TYPE_CHECKING:
    from megatron_vlm.models.specs import KernelChoice

LAYOUT_AXES = ("tp", "pp", "vpp", "cp", "ep", "etp", "dp")
"""The parallel sizes a checkpoint manifest records, in order."""


@dataclass(kw_only=True)
class Runtime:
    """What :func:`~megatron_vlm.parallel.init.init_distributed` set up for this process."""

    parallel: ParallelConfig
    """The layout the groups were asked for."""
    pg_collection: ProcessGroupCollection
    """Every megatron process group of this rank (tp, pp, mp, embd, pos_embd, cp, tp_cp, ep,
    expt_tp, tp_ep, tp_ep_pp, tp_dp_cp, dp, dp_cp, expt_dp, ...)."""
    device: torch.device
    """Where this rank computes: its CUDA device under NCCL, else the CPU."""
    rank: int
    """Global rank."""
    world_size: int
    """Ranks in the default group."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (None: not interleaved)."""
    kernels: KernelChoice | None = None
    """The model's layer implementations and fusions on this machine
    (``models.vlm.kernel_choice``), when ``init_distributed`` was given the model; None
    otherwise (builders then resolve ``model.kernels`` themselves)."""

    @property
    def dp_size(self) -> int:
        """Data-parallel size (``init_distributed``'s former return value)."""
        return self.pg_collection.dp.size()

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group (which shard of the data it reads)."""
        return self.pg_collection.dp.rank()

    @property
    def pp_rank(self) -> int:
        return self.pg_collection.pp.rank()

    @property
    def pp_size(self) -> int:
        return self.pg_collection.pp.size()

    def layout(self) -> dict[str, int]:
        """This run's parallel sizes as a checkpoint manifest records them."""
        return layout_of(self.pg_collection, self.vpp)


def layout_of(pg_collection: ProcessGroupCollection, vpp: int | None) -> dict[str, int]:
    """``{tp, pp, vpp, cp, ep, etp, dp}`` sizes of ``pg_collection`` (``vpp`` None counts as 1)."""
    pgs = pg_collection
    return {"tp": pgs.tp.size(), "pp": pgs.pp.size(), "vpp": vpp or 1, "cp": pgs.cp.size(),
            "ep": pgs.ep.size(), "etp": pgs.expt_tp.size(), "dp": pgs.dp.size()}


def _initialised_groups() -> ProcessGroupCollection | None:
    """The groups ``init_distributed`` made in this process, or None when there are none."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return ProcessGroupCollection.use_mpu_process_groups()
    return None


def groups_or_default(pg_collection: ProcessGroupCollection | None = None, *,
                      required: bool = False) -> ProcessGroupCollection | None:
    """``pg_collection`` itself; for None the groups ``init_distributed`` made in this process,
    or None when there are none (one process: callers reduce over nothing).

    Args:
        pg_collection: the caller's groups (training passes ``Runtime.pg_collection``).
        required: raise instead of returning None (builders that cannot work without groups).
    """
    if pg_collection is not None:
        return pg_collection
    groups = _initialised_groups()
    if groups is None and required:
        raise RuntimeError(
            "no process groups: call megatron_vlm.parallel.init.init_distributed (one process: "
            "ensure_single_process_groups) first, or pass pg_collection")
    return groups


def layout_or_default(layout: Mapping[str, int] | None = None) -> dict[str, int]:
    """``layout`` itself (``Runtime.layout()``); for None the sizes of the groups
    ``init_distributed`` made in this process, or ``{}`` when there are none."""
    if layout is not None:
        return dict(layout)
    groups = _initialised_groups()
    if groups is None:
        return {}
    from megatron.core import parallel_state

    return layout_of(groups, parallel_state.get_virtual_pipeline_model_parallel_world_size())


def compute_device() -> torch.device:
    """Where this rank computes: its current CUDA device when there is one, else the CPU."""
    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))
