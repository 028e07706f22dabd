"""Issue 16 item 1: every ``torch.distributed`` communication call goes through
``megatron_vlm/parallel/comm.py``, which puts tensors on the group's device.

The rule (an AST scan of ``megatron_vlm/``, whatever ``torch.distributed`` is called in a file):
outside ``parallel/comm.py`` no file may reference a communication function of
``torch.distributed`` (or ``torch.distributed.distributed_c10d``) -- a collective, ``barrier``,
any ``*_object*`` call, send/recv/isend/irecv, ``P2POp``/``batch_isend_irecv`` -- whether it
calls it, binds it to another name, imports it by name or reaches it with ``getattr``.
Read-only queries (``get_rank``, ``get_backend``, ``ReduceOp``, ``ProcessGroup`` ...) are free.

Also here: the device decision of ``comm.comm_device`` and the CPU/gloo path handing the
caller's own tensor to torch (no copy, so CPU results cannot change).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_vlm"
ALLOWED = PACKAGE / "parallel" / "comm.py"
DIST_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d"}
COMM_NAMES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "broadcast", "gather", "scatter", "all_to_all", "all_to_all_single",
    "reduce", "send", "recv", "isend", "irecv", "P2POp", "batch_isend_irecv", "barrier",
    "monitored_barrier",
}


def is_comm_name(name: str) -> bool:
    """A communication entry point: a listed collective or any object collective."""
    return name == "*" or name in COMM_NAMES or "_object" in name


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> module path for every import in the file (any scope)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:  # ``import torch.distributed`` binds ``torch``
                    root = a.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` with ``a`` replaced by what it was imported as; None if not a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _is_dist_comm(dotted: str | None) -> bool:
    if dotted is None or "." not in dotted:
        return False
    module, name = dotted.rsplit(".", 1)
    return module in DIST_MODULES and is_comm_name(name)


def violations(source: str, filename: str = "<sample>") -> list[str]:
    """``file:line what`` for each reference to a torch.distributed communication function."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.ImportFrom) and node.module in DIST_MODULES and not node.level:
            bad = [a.name for a in node.names if is_comm_name(a.name)]
            what = f"from {node.module} import {', '.join(bad)}" if bad else None
        elif isinstance(node, ast.Attribute) and _is_dist_comm(_dotted(node, aliases)):
            what = _dotted(node, aliases)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "getattr" and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _is_dist_comm(f"{_dotted(node.args[0], aliases)}.{node.args[1].value}")):
            what = f"getattr(..., {node.args[1].value!r})"
        if what:
            found.append(f"{filename}:{node.lineno} {what}")
    return found


def test_no_communication_call_outside_comm_module():
    files = sorted(p for p in PACKAGE.rglob("*.py") if p != ALLOWED)
    assert len(files) > 50  # the scan sees the package
    found = [v for p in files
             for v in violations(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not found, ("torch.distributed communication outside megatron_vlm/parallel/comm.py "
                       "(call it through comm, which places tensors on the group's device):\n"
                       + "\n".join(found))


STRAY = [
    "import torch.distributed as dist\ndef f(t):\n    dist.all_reduce(t)\n",
    "import torch\ndef f(t):\n    torch.distributed.all_reduce(t)\n",
    "import torch.distributed\ndef f(t):\n    torch.distributed.barrier()\n",
    "import torch as th\ndef f(t):\n    th.distributed.broadcast(t, 0)\n",
    "from torch import distributed\ndef f(t):\n    distributed.all_gather([t], t)\n",
    "from torch import distributed as d\ndef f(o):\n    d.all_gather_object([None], o)\n",
    "from torch.distributed import all_reduce\ndef f(t):\n    all_reduce(t)\n",
    "from torch.distributed import all_reduce as ar\ndef f(t):\n    ar(t)\n",
    "from torch.distributed import *\n",
    "from torch.distributed import distributed_c10d as c\ndef f(t):\n    c.send(t, 1)\n",
    "import torch.distributed.distributed_c10d as c\ndef f(t):\n    c.irecv(t, 0)\n",
    "def f(t):\n    import torch.distributed as dist\n    op = dist.P2POp(dist.isend, t, 1)\n",
    "import torch.distributed as dist\nfn = dist.reduce_scatter_tensor\n",
    "import torch.distributed as dist\nfn = getattr(dist, 'batch_isend_irecv')\n",
    "import torch.distributed as dist\ndist.broadcast_object_list([1], src=0)\n",
    "import torch.distributed as dist\ndist.monitored_barrier()\n",
]


@pytest.mark.parametrize("source", STRAY)
def test_scan_finds_a_stray_call(source):
    assert violations(source)


def test_scan_leaves_queries_and_other_modules_alone():
    clean = (
        "import torch\nimport torch.distributed as dist\n"
        "from torch.distributed.checkpoint import save\n"
        "from megatron_vlm.parallel import comm\n"
        "def f(t, g: dist.ProcessGroup):\n"
        "    if dist.is_initialized() and dist.get_world_size(g) > 1:\n"
        "        comm.all_reduce(t, op=dist.ReduceOp.MAX, group=g)\n"
        "    all_reduce = lambda x: x\n    all_reduce(t)\n"
        "    return dist.get_rank(), dist.get_backend(g), torch.cuda.is_available()\n"
    )
    assert violations(clean) == []


def test_comm_device_follows_the_group_backend(monkeypatch, megatron_groups):
    from megatron_vlm.parallel import comm

    assert dist.get_backend() == "gloo"
    assert comm.comm_device() == torch.device("cpu")
    # An NCCL group (none can exist on a CPU machine): the decision reads only the backend name
    # and the current CUDA device.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.comm_device() == torch.device("cuda", 3)


def test_gloo_collectives_take_the_callers_own_cpu_tensor(monkeypatch, megatron_groups):
    """On gloo the tensor torch receives is the caller's (same storage): no copy, no device move,
    so every CPU result is what the direct ``torch.distributed`` call gave."""
    from megatron_vlm.parallel import comm

    seen = []
    real_reduce, real_gather, real_broadcast = dist.all_reduce, dist.all_gather, dist.broadcast

    def record(real):
        def call(*args, **kwargs):
            seen.append([a for a in args if torch.is_tensor(a) or isinstance(a, list)])
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(dist, "all_reduce", record(real_reduce))
    monkeypatch.setattr(dist, "all_gather", record(real_gather))
    monkeypatch.setattr(dist, "broadcast", record(real_broadcast))
    t = torch.tensor([1.5, -2.0], dtype=torch.float64)
    comm.all_reduce(t, op=comm.ReduceOp.MAX)
    out = [torch.zeros(2, dtype=torch.float64)]
    comm.all_gather(out, t)
    comm.broadcast(t, src=0)
    assert seen[0][0] is t and seen[1][0][0] is out[0] and seen[1][1] is t and seen[2][0] is t
    assert torch.equal(out[0], torch.tensor([1.5, -2.0], dtype=torch.float64))
    assert t.device.type == "cpu" and t.tolist() == [1.5, -2.0]
