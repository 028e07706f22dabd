"""Every ``torch.distributed`` communication call of the package, on the group's device.

NCCL has no CPU path: a CPU tensor handed to an NCCL group raises, and gloo takes only CPU
tensors for most collectives. Callers keep their tensors where they compute with them (loss sums
and logit maxima on the CPU, gradients on the accelerator); this module moves them.

Contract:

- ``comm_device(group)`` is where ``group`` communicates: the current CUDA device when its
  backend is NCCL, the CPU otherwise (gloo).
- Tensor collectives take the caller's tensors on any device. A tensor already on the group's
  device is handed to torch as it is (no copy: the CPU/gloo path is the call it always was).
  Otherwise it is copied there, and results are copied back into the caller's tensors (in-place
  collectives: ``all_reduce``, ``broadcast``, the output list of ``all_gather``), so the caller
  sees its results on its own device.
- Object collectives (``all_gather_object``) pickle through torch, which already picks the
  device for the group (``distributed_c10d._get_object_coll_device``); they pass through here so
  that one module holds every call.
- ``barrier`` on NCCL names the current device (torch otherwise guesses one per rank).
- Every call is blocking (no ``async_op``): the package has no overlapped communication of its
  own; megatron-core's overlap lives in megatron-core.

``tests/unit/test_comm_rules.py`` scans ``megatron_vlm/`` and fails if a collective, barrier,
object collective or point-to-point call of ``torch.distributed`` is referenced anywhere but
here. Read-only queries (``get_rank``, ``get_world_size``, ``is_initialized``, ``get_backend``,
``new_group``, ``ReduceOp``, ``ProcessGroup``) stay where they are used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp
"""Re-exported so a caller of :func:`all_reduce` needs no second import."""

ProcessGroup = dist.ProcessGroup


def comm_device(group: ProcessGroup | None = None) -> torch.device:
    """The device ``group`` (default: the default group) takes tensors on: the current CUDA
    device under NCCL, the CPU under gloo (and any other backend)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` itself when it is on ``device``, else a copy there."""
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = ReduceOp.SUM,
               group: ProcessGroup | None = None) -> None:
    """Reduce ``tensor`` over ``group`` in place (on its own device)."""
    work = _on(tensor, comm_device(group))
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
               group: ProcessGroup | None = None) -> None:
    """Every rank's ``tensor`` into ``tensor_list`` (in rank order, on the list's devices)."""
    device = comm_device(group)
    work_in = _on(tensor, device)
    work_out = [t if t.device == device else torch.empty_like(t, device=device)
                for t in tensor_list]
    dist.all_gather(work_out, work_in, group=group)
    for out, got in zip(tensor_list, work_out):
        if got is not out:
            out.copy_(got)


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup | None = None) -> None:
    """``tensor`` of global rank ``src`` into ``tensor`` on every rank of ``group``."""
    work = _on(tensor, comm_device(group))
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)


def all_gather_object(object_list: list[Any], obj: Any,
                      group: ProcessGroup | None = None) -> None:
    """Every rank's picklable ``obj`` into ``object_list`` (torch picks the device)."""
    dist.all_gather_object(object_list, obj, group=group)


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group``."""
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)
