"""Start-up shims for megatron-core 0.16.1: the narrow places where it assumes CUDA or
Transformer Engine.

:func:`apply_cpu_shims` installs them once per process (``init_distributed`` calls it);
:func:`remove_cpu_shims` puts every original back (``destroy_distributed`` calls it), and the
next start-up installs them again. Nothing in site-packages is edited: we rebind module and
class attributes, each listed in :data:`SHIMS` with the megatron-core 0.16.1 lines it covers
(``tests/unit/test_cpu_shims.py`` checks that the table and what is really patched agree, so
a megatron upgrade shows what to revisit), and push one ``TorchFunctionMode``.

Two sets, by what the machine lacks:

- ``no_te`` (Transformer Engine absent, CPU or GPU): without TE, megatron's ``te`` is a
  ``MagicMock`` (``extensions/transformer_engine.py:74``), so MLA imports MagicMock-derived TE
  classes with ``HAVE_TE = True``: ``isinstance(x, TELinear)`` misbehaves and MLA's ``Linear``
  is modelopt's. We set ``HAVE_TE = False``, ``TELinear = None``, and ``Linear`` to our
  ``DuplicatedLinear`` so the local MLA spec's TP-duplicated down-projections are accepted
  (``models/linear.py``). ``moe_utils`` lacks ``te_general_gemm`` (``NameError``): ``None``.
- ``no_cuda`` (no CUDA device):
  1. the CUDA RNG tracker's states become CPU generator states;
  2. ``device="cuda"``/``.cuda()``/``.to("cuda")`` become CPU (``_CudaToCpuMode``) and
     ``torch.cuda.current_device()`` is the CPU device;
  3. streams/events are no-op stand-ins; synchronize/empty_cache/set_device do nothing and
     memory statistics read 0;
  4. megatron's optimizers assert ``t.type() == 'torch.cuda.FloatTensor'``: CPU float tensors
     report the CUDA type name to the no-argument ``Tensor.type()``;
  5. ``maybe_move_tensor_to_cpu`` leaves CPU tensors as tensors even with ``as_numpy=True`` and
     gloo's ``all_to_all_single`` then gets tensor split sizes: we return numpy as asked;
  6. ``tensor_parallel/mappings.py:150`` gathers variable-sized token blocks with a list
     ``all_gather`` (the all-to-all MoE dispatcher under TP/SP); gloo needs equal sizes: the
     wrapper pads to the largest block, gathers through ``parallel/comm.py`` and copies the
     real rows out -- only when sizes differ on a gloo group;
  7. megatron's ``jit_fuser`` would ``torch.compile`` small functions (19 s first MoE forward
     on CPU): dynamo is disabled.
"""

from __future__ import annotations

import functools
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.overrides import (
    TorchFunctionMode,
    _get_current_function_mode_stack,
    _pop_mode,
    _push_mode,
)

from megatron_vlm.parallel import comm

_MLA = "megatron.core.transformer.multi_latent_attention"
_RANDOM = "megatron.core.tensor_parallel.random"
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"


@dataclass(frozen=True, kw_only=True)
class Shim:
    """One patched symbol ``target.attr``."""

    target: str
    """Dotted path of the module or class whose attribute is rebound."""
    attr: str
    """The attribute."""
    covers: str
    """The megatron-core 0.16.1 ``file:line`` places (under ``megatron/core/``) it serves."""
    when: Literal["no_te", "no_cuda"]
    """Installed when Transformer Engine is absent (``no_te``) or CUDA is (``no_cuda``)."""
    token: str = ""
    """Text every covered line contains (default: ``attr``); the test reads the lines."""


def _cuda(attr: str, covers: str) -> Shim:
    return Shim(target="torch.cuda", attr=attr, covers=covers, when="no_cuda")


SHIMS: tuple[Shim, ...] = (
    Shim(target=_MLA, attr="HAVE_TE", covers="transformer/multi_latent_attention.py:62,184",
         when="no_te"),
    Shim(target=_MLA, attr="TELinear", when="no_te",
         covers="transformer/multi_latent_attention.py:57,185,408,453"),
    Shim(target=_MLA, attr="Linear", when="no_te",
         covers="transformer/multi_latent_attention.py:60,411,456"),
    Shim(target=_MOE_UTILS, attr="te_general_gemm", when="no_te",
         covers="transformer/moe/moe_utils.py:34,1192,1225"),
    Shim(target=_RANDOM, attr="_get_cuda_rng_state", when="no_cuda",
         covers="tensor_parallel/random.py:41,125,230,250"),
    Shim(target=_RANDOM, attr="_set_cuda_rng_state", when="no_cuda",
         covers="tensor_parallel/random.py:72,127,240,255"),
    _cuda("get_rng_state", "tensor_parallel/random.py:235,238; rerun_state_machine.py:957"),
    _cuda("set_rng_state", "rerun_state_machine.py:970"),
    Shim(target="torch.cuda.random", attr="get_rng_state", when="no_cuda",
         covers="tensor_parallel/random.py:55"),
    _cuda("manual_seed", "tensor_parallel/random.py:237,422"),
    _cuda("current_device", "models/common/embeddings/rotary_pos_embedding.py:78,162; "
          "distributed/distributed_data_parallel.py:230; rerun_state_machine.py:525,567"),
    _cuda("Stream", "transformer/moe/token_dispatcher.py:445; "
          "distributed/distributed_data_parallel.py:230"),
    _cuda("Event", "pipeline_parallel/fine_grained_activation_offload.py:339,340"),
    _cuda("current_stream", "transformer/moe/token_dispatcher.py:871,873"),
    _cuda("default_stream", "distributed/param_and_grad_buffer.py:422,529"),
    _cuda("stream", "transformer/moe/token_dispatcher.py:874; "
          "distributed/param_and_grad_buffer.py:417"),
    _cuda("synchronize", "dist_checkpointing/strategies/async_utils.py:212; "
          "dist_checkpointing/strategies/filesystem_async.py:230; "
          "pipeline_parallel/p2p_communication.py:242,398"),
    _cuda("empty_cache", "optimizer/optimizer.py:362; transformer/mlp.py:346"),
    _cuda("memory_allocated", "distributed/fsdp/src/megatron_fsdp/param_and_grad_buffer.py:3792"),
    _cuda("memory_reserved", "distributed/fsdp/src/megatron_fsdp/param_and_grad_buffer.py:3793"),
    _cuda("set_device", "dist_checkpointing/strategies/async_utils.py:488"),
    Shim(target="torch.Tensor", attr="type", when="no_cuda",
         covers="optimizer/clip_grads.py:167; optimizer/optimizer.py:671,690; "
                "optimizer/distrib_optimizer.py:361,420,582"),
    Shim(target=_MOE_UTILS, attr="maybe_move_tensor_to_cpu", when="no_cuda",
         covers="transformer/moe/moe_utils.py:1078"),
    Shim(target=_DISPATCHER, attr="maybe_move_tensor_to_cpu", when="no_cuda",
         covers="transformer/moe/token_dispatcher.py:31,876,879"),
    Shim(target="torch.distributed", attr="all_gather", when="no_cuda",
         covers="tensor_parallel/mappings.py:150"),
    Shim(target="torch._dynamo.config", attr="disable", when="no_cuda", covers="jit.py:21",
         token="torch.compile"),
)
"""Every symbol the shims rebind, with the megatron-core 0.16.1 lines it covers."""

_TABLE = {(s.target, s.attr): s for s in SHIMS}
_MISSING = object()
_ORIGINALS: dict[tuple[str, str], Any] = {}
"""``(target, attr)`` -> the value before patching (``_MISSING``: the attribute did not exist,
or a class inherited it), in patching order."""
_STATE: dict[str, Any] = {"installed": False, "cpu": False, "mode": None, "env": False,
                          "set": None}


def _patch(target: str, attr: str, value: Any) -> None:
    """Rebind ``target.attr`` to ``value`` and remember the original (a symbol missing from
    :data:`SHIMS` is refused: the table is the list of what we touch)."""
    if (target, attr) not in _TABLE:
        raise KeyError(f"{target}.{attr} is not in cpu_shims.SHIMS; add it with the megatron "
                       "lines it covers")
    if _TABLE[(target, attr)].when != _STATE["set"]:
        raise KeyError(f"{target}.{attr} is listed under when={_TABLE[(target, attr)].when!r} "
                       f"but installed with the {_STATE['set']!r} set")
    owner = pkgutil.resolve_name(target)
    if (target, attr) not in _ORIGINALS:
        if isinstance(owner, type):  # restore an inherited method by deleting ours
            _ORIGINALS[(target, attr)] = vars(owner).get(attr, _MISSING)
        else:
            _ORIGINALS[(target, attr)] = getattr(owner, attr, _MISSING)
    setattr(owner, attr, value)


def _wrap(target: str, attr: str, make: Callable[[Any], Any]) -> None:
    """Rebind ``target.attr`` to ``make(original)``."""
    _patch(target, attr, make(getattr(pkgutil.resolve_name(target), attr)))


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` (and ``.cuda()``) to CPU for every torch call (``no_cuda`` 2)."""

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
    """Stand-in for ``torch.cuda.Stream``/``Event`` on CPU (``no_cuda`` 3)."""

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


def _shim_no_te() -> None:
    """``no_te``: no TE means no TE classes, not MagicMocks; MLA accepts ``DuplicatedLinear``."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_vlm.models.linear import DuplicatedLinear

    _patch(_MLA, "HAVE_TE", False)
    _patch(_MLA, "TELinear", None)
    _patch(_MLA, "Linear", DuplicatedLinear)
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(_MOE_UTILS, "te_general_gemm", None)


def _shim_rng() -> None:
    """1: CUDA RNG tracker state -> CPU generator state."""

    def _get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    def _cuda_get_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    _patch(_RANDOM, "_get_cuda_rng_state", _get_state)
    _patch(_RANDOM, "_set_cuda_rng_state", _set_state)
    _patch("torch.cuda", "get_rng_state", _cuda_get_state)
    _patch("torch.cuda", "set_rng_state",
           lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _patch("torch.cuda.random", "get_rng_state", _cuda_get_state)
    # Only the CPU generator: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    _patch("torch.cuda", "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))


def _shim_cuda_namespace() -> None:
    """2, 3: ``torch.cuda`` entry points megatron-core calls unconditionally."""
    _patch("torch.cuda", "current_device", lambda: torch.device("cpu"))
    _patch("torch.cuda", "Stream", _NullStream)
    _patch("torch.cuda", "Event", _NullStream)
    _patch("torch.cuda", "current_stream", lambda *a, **k: _NullStream())
    _patch("torch.cuda", "default_stream", lambda *a, **k: _NullStream())
    _patch("torch.cuda", "stream", lambda *a, **k: _NullStream())
    _patch("torch.cuda", "synchronize", lambda *a, **k: None)
    _patch("torch.cuda", "empty_cache", lambda: None)
    _patch("torch.cuda", "memory_allocated", lambda *a, **k: 0)
    _patch("torch.cuda", "memory_reserved", lambda *a, **k: 0)
    _patch("torch.cuda", "set_device", lambda *a, **k: None)


def _cuda_type_name(orig_type: Callable) -> Callable:
    """4: ``Tensor.type()`` (no-argument form only, which is how megatron's asserts call it)
    reports ``torch.cuda.*`` for CPU tensors."""

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

    return _type


def _numpy_split_sizes(orig: Callable) -> Callable:
    """5: ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` returns numpy for CPU tensors too."""

    @functools.wraps(orig)
    def _move(tensor, as_numpy: bool = False, record_stream: bool = False):
        out = orig(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out):
            return out.numpy()
        return out

    return _move


def _uneven_all_gather(orig: Callable) -> Callable:
    """6: list all_gather with unequal dim-0 sizes on gloo (``orig`` is torch's own
    ``all_gather``, which the wrapper stands in for)."""

    @functools.wraps(orig)
    def _all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or async_op or dist.get_backend(group) != "gloo":
            return orig(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded_in = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
        padded_in[: tensor.shape[0]] = tensor
        padded_out = [torch.empty_like(padded_in) for _ in tensor_list]
        comm.all_gather(padded_out, padded_in, group=group)  # equal sizes: torch's own call
        for out, got in zip(tensor_list, padded_out):
            out.copy_(got[: out.shape[0]])
        return None

    return _all_gather


def _install_no_cuda() -> None:
    # The env var is read when torch is imported, so also flip the config it sets (7).
    if "TORCH_COMPILE_DISABLE" not in os.environ:
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
        _STATE["env"] = True
    import torch._dynamo  # noqa: F401 -- resolves torch._dynamo.config
    from megatron.core.transformer.moe import moe_utils, token_dispatcher  # noqa: F401

    _patch("torch._dynamo.config", "disable", True)
    _shim_rng()
    _shim_cuda_namespace()
    _wrap("torch.Tensor", "type", _cuda_type_name)
    _wrap(_MOE_UTILS, "maybe_move_tensor_to_cpu", _numpy_split_sizes)
    _patch(_DISPATCHER, "maybe_move_tensor_to_cpu",
           pkgutil.resolve_name(_MOE_UTILS).maybe_move_tensor_to_cpu)
    _wrap("torch.distributed", "all_gather", _uneven_all_gather)
    mode = _CudaToCpuMode()
    mode.__enter__()  # process-wide until remove_cpu_shims
    _STATE["mode"] = mode


def apply_cpu_shims() -> bool:
    """Install the shims this machine needs, once per process until :func:`remove_cpu_shims`:
    the ``no_te`` set without Transformer Engine, the ``no_cuda`` set without CUDA.

    Returns:
        Whether the ``no_cuda`` (CPU) shims are active.
    """
    if not _STATE["installed"]:
        from megatron.core.extensions import transformer_engine as mte

        if not mte.HAVE_TE:
            _STATE["set"] = "no_te"
            _shim_no_te()
        if not torch.cuda.is_available():
            _STATE["set"] = "no_cuda"
            _install_no_cuda()
            _STATE["cpu"] = True
        _STATE.update(installed=True, set=None)
    return _STATE["cpu"]


def _pop_our_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off torch's function-mode stack, keeping any mode pushed after it."""
    if mode not in _get_current_function_mode_stack():
        return
    above = []
    while (top := _pop_mode()) is not mode:
        above.append(top)
    for other in reversed(above):
        _push_mode(other)


def remove_cpu_shims() -> None:
    """Put back every symbol :func:`apply_cpu_shims` rebound (latest first) and leave the
    CUDA-to-CPU mode; the next :func:`apply_cpu_shims` installs them again."""
    for (target, attr), original in reversed(list(_ORIGINALS.items())):
        owner = pkgutil.resolve_name(target)
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _ORIGINALS.clear()
    if _STATE["mode"] is not None:
        _pop_our_mode(_STATE["mode"])
    if _STATE["env"]:
        os.environ.pop("TORCH_COMPILE_DISABLE", None)
    _STATE.update(installed=False, cpu=False, mode=None, env=False, set=None)


def patched_symbols() -> list[tuple[str, str]]:
    """``(target, attr)`` of every symbol rebound now, in patching order."""
    return list(_ORIGINALS)
