"""CPU shims for megatron-core 0.16.1: the narrow places where it assumes CUDA.

Everything here is active only when ``torch.cuda.is_available()`` is False, is applied once by
:func:`apply_cpu_shims`, and names the megatron-core 0.16.1 lines it covers. Nothing in
site-packages is edited; we rebind module attributes at import time.

Shims (megatron-core 0.16.1 file:line):

1. ``tensor_parallel/random.py:55,72,235,423`` -- the CUDA RNG tracker reads/writes
   ``torch.cuda`` RNG state. On CPU the tracker's states are CPU generator states.
2. ``models/common/embeddings/rotary_pos_embedding.py:78,162``, ``transformer/utils.py:35``,
   ``tensor_parallel/layers.py``, ``transformer/moe/router.py``, ``optimizer/*``,
   ``pipeline_parallel/p2p_communication.py`` and ~50 more -- ``torch.cuda.current_device()``,
   ``device="cuda"`` and ``.cuda()``. A ``TorchFunctionMode`` rewrites a CUDA device argument to
   CPU, and ``torch.cuda.current_device()`` returns the CPU device.
3. ``extensions/transformer_engine.py:74`` -- without TE, ``te`` is a ``MagicMock`` and
   ``TELinear`` a class deriving from it, so ``isinstance(x, TELinear)`` in
   ``transformer/multi_latent_attention.py:185`` misbehaves. We set ``HAVE_TE=False`` and
   ``TELinear=None`` where MLA reads them.
4. ``transformer/moe/token_dispatcher.py:445`` ``torch.cuda.Stream()`` and
   ``torch.cuda.current_stream()``/``torch.cuda.stream()``/``torch.cuda.Event`` used by the
   dispatchers and the pipeline schedules -- no-op stand-ins.
5. ``optimizer/clip_grads.py:167``, ``optimizer/optimizer.py:671,690``,
   ``optimizer/distrib_optimizer.py:361,420,582`` assert ``t.type() == 'torch.cuda.FloatTensor'``:
   CPU float tensors report the CUDA type name to these asserts only (see ``_TypeNameTensor``).
6. ``transformer/moe/moe_utils.py:1192,1225`` reads ``te_general_gemm``, undefined without TE
   (``NameError``): bound to ``None``. ``moe_utils.py:1093`` ``maybe_move_tensor_to_cpu`` leaves
   CPU tensors as tensors even with ``as_numpy=True``, and gloo's ``all_to_all_single`` then gets
   tensor split sizes: the shim returns numpy as asked (rebinding the name
   ``transformer/moe/token_dispatcher.py:31`` imported).
7. ``tensor_parallel/mappings.py:150`` gathers variable-sized token blocks with a list
   ``all_gather`` (the all-to-all MoE dispatcher under TP/SP, ``token_dispatcher.py:696``); gloo
   requires equal sizes. The shim pads each block to the largest along dim 0, gathers, and copies
   the real rows out -- only when sizes differ on a gloo group.
8. ``torch.cuda.synchronize`` / ``empty_cache`` / memory stats called unconditionally by
   ``dist_checkpointing/strategies/async_utils.py:165,212,488,604``,
   ``strategies/filesystem_async.py:230`` and the optimizer: no-ops on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` (and ``.cuda()``) to CPU for every torch call (shim 2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``/``Event`` on CPU (shim 4)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullStream:
        return self

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True


def _shim_rng() -> None:
    """Shim 1: CUDA RNG tracker state -> CPU generator state."""
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    # Only the CPU generator: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _shim_te_mock() -> None:
    """Shim 3: no TE means no TE classes, not MagicMocks."""
    from megatron.core.extensions import transformer_engine as mte
    from megatron.core.transformer import multi_latent_attention as mla

    if not mte.HAVE_TE:
        mla.HAVE_TE = False
        mla.TELinear = None


def _shim_cuda_namespace() -> None:
    """Shims 2, 4, 6: ``torch.cuda`` entry points megatron-core calls unconditionally."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: _NullStream()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_reserved = lambda *a, **k: 0
    torch.cuda.set_device = lambda *a, **k: None


def _shim_type_asserts() -> None:
    """Shim 5: megatron asserts ``grad.type() == 'torch.cuda.FloatTensor'``.

    On CPU the tensor type is ``torch.FloatTensor``; we make ``Tensor.type()`` (no-argument form
    only, which is how those asserts call it) report the CUDA name for CPU float tensors.
    """
    orig_type = torch.Tensor.type

    @functools.wraps(orig_type)
    def _type(self: torch.Tensor, *args: Any, **kwargs: Any):
        out = orig_type(self, *args, **kwargs)
        if (
            not args
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
            and self.device.type == "cpu"
        ):
            return out.replace("torch.", "torch.cuda.", 1)
        return out

    torch.Tensor.type = _type


def _shim_moe_utils() -> None:
    """Shim 6: TE-less router GEMM and CPU split sizes for the all-to-all dispatcher."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    orig = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(orig)
    def _move(tensor, as_numpy: bool = False, record_stream: bool = False):
        out = orig(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out):
            return out.numpy()
        return out

    moe_utils.maybe_move_tensor_to_cpu = _move
    token_dispatcher.maybe_move_tensor_to_cpu = _move


def _shim_uneven_all_gather() -> None:
    """Shim 7: list all_gather with unequal dim-0 sizes on gloo."""
    import torch.distributed as dist

    orig = dist.all_gather

    @functools.wraps(orig)
    def _all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or async_op or dist.get_backend(group) != "gloo":
            return orig(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded_in = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
        padded_in[: tensor.shape[0]] = tensor
        padded_out = [torch.empty_like(padded_in) for _ in tensor_list]
        orig(padded_out, padded_in, group=group)
        for out, got in zip(tensor_list, padded_out):
            out.copy_(got[: out.shape[0]])
        return None

    dist.all_gather = _all_gather


def apply_cpu_shims() -> bool:
    """Apply the CPU shims once per process if CUDA is absent. Returns whether they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    # megatron's jit_fuser would torch.compile small functions: 19 s first MoE forward on CPU.
    # The env var is read when torch is imported, so also flip the config it sets.
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    import torch._dynamo as dynamo

    dynamo.config.disable = True
    _shim_rng()
    _shim_cuda_namespace()
    _shim_te_mock()
    _shim_type_asserts()
    _shim_moe_utils()
    _shim_uneven_all_gather()
    _CudaToCpuMode().__enter__()
    _APPLIED = True
    return True
