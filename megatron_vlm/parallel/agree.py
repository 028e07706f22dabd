"""Small agreements between ranks: gather JSON values, and make a start-up refusal seen by any
rank end the run on every rank with the same message (a file visible to some nodes only must not
leave the other ranks blocked in the next collective).

Built on ``parallel/comm.py``: tensors travel on the group backend's device (CUDA under NCCL,
CPU under gloo). ``comm_device`` is re-exported from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from megatron_vlm.parallel import comm
from megatron_vlm.parallel.comm import comm_device

__all__ = ["StartupError", "agree_on_startup", "all_gather_json", "comm_device"]

T = TypeVar("T")


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (``[obj]`` without a process group).

    Through torch's object all-gather (``comm.all_gather_object``, on the group's device); the
    JSON round trip gives every rank the same plain types as the one-process path."""
    text = json.dumps(obj)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [json.loads(text)]
    gathered: list[Any] = [None] * dist.get_world_size()
    comm.all_gather_object(gathered, text)
    return [json.loads(t) for t in gathered]


class StartupError(RuntimeError):
    """A refused start (bad config value, missing data or tokenizer), raised on every rank with
    the same one-line message; the CLI prints it once (rank 0) and exits 2."""


def agree_on_startup(step: Callable[[], T], what: str,
                     catch: tuple[type[BaseException], ...] = (ValueError, OSError)) -> T:
    """Run ``step`` on every rank; if it raised one of ``catch`` on any rank, raise
    :class:`StartupError` on all ranks with the lowest failing rank's message."""
    try:
        result, error = step(), None
    except catch as e:
        result, error = None, f"{what}: {e}"
    errors = [(r, e) for r, e in enumerate(all_gather_json(error)) if e]
    if errors:
        rank, message = errors[0]
        raise StartupError(message if rank == 0 else f"(rank {rank}) {message}")
    return result
