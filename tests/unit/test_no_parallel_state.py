"""Issue 16 item 2: process groups are passed down, not read from megatron's globals.

The rule (an AST scan of ``megatron_vlm/{models,optim,checkpoint,data,convert}``): no file there
references megatron's ``parallel_state`` (or its old alias ``mpu``) -- no import of it under any
name, no attribute or name ``parallel_state``/``mpu``, no ``getattr``/``import_module`` of it by
string, and no ``ProcessGroupCollection.use_mpu_process_groups`` (which reads it for the
caller). Those modules take a ``pg_collection`` (or one group) as an argument; a ``None`` from a
test or tool is resolved in one place, ``parallel/runtime.py``.

Also here: a training run passes its runtime's groups to every component, so that one place is
never asked (it is made to fail for the whole run), and what ``init_distributed`` returns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_vlm"
SCANNED = ("models", "optim", "checkpoint", "data", "convert")
BANNED_MODULES = {"megatron.core.parallel_state", "megatron.core.mpu"}
BANNED_NAMES = {"parallel_state", "mpu", "use_mpu_process_groups"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> module path for every import in the file (any scope)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _banned_module(path: str | None) -> bool:
    return path is not None and any(path == m or path.startswith(m + ".")
                                    for m in BANNED_MODULES)


def _what(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if _banned_module(a.name)]
        return f"import {', '.join(bad)}" if bad else None
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        bad = [a.name for a in node.names
               if _banned_module(node.module) or _banned_module(f"{node.module}.{a.name}")
               or a.name in BANNED_NAMES]
        return f"from {node.module} import {', '.join(bad)}" if bad else None
    if isinstance(node, ast.Attribute) and (
            node.attr in BANNED_NAMES or _banned_module(_dotted(node, aliases))):
        return _dotted(node, aliases) or f".{node.attr}"
    if isinstance(node, ast.Name) and (
            node.id in BANNED_NAMES or _banned_module(aliases.get(node.id))):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            node.value in BANNED_NAMES or node.value in BANNED_MODULES):
        return repr(node.value)  # getattr(core, "parallel_state"), import_module("...")
    return None


def violations(source: str, filename: str = "<sample>") -> list[str]:
    """``file:line what`` for each reference to megatron's parallel_state."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    return [f"{filename}:{node.lineno} {what}" for node in ast.walk(tree)
            if (what := _what(node, aliases))]


def test_no_parallel_state_below_training():
    files = sorted(p for d in SCANNED for p in (PACKAGE / d).rglob("*.py"))
    assert len(files) > 60 and {p.relative_to(PACKAGE).parts[0] for p in files} == set(SCANNED)
    found = [v for p in files
             for v in violations(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not found, ("megatron's parallel_state read below training/ (take a pg_collection or "
                       "the group as an argument; None resolves in parallel/runtime.py):\n"
                       + "\n".join(found))


STRAY = [
    "from megatron.core import parallel_state\nparallel_state.get_data_parallel_rank()\n",
    "from megatron.core import parallel_state as ps\ng = ps.get_tensor_model_parallel_group()\n",
    "def f():\n    from megatron.core import mpu\n    return mpu.get_context_parallel_group()\n",
    "import megatron.core.parallel_state\n",
    "import megatron.core.parallel_state as ps\n",
    "from megatron.core.parallel_state import get_context_parallel_group\n",
    "from megatron.core.parallel_state import get_context_parallel_group as cp\n",
    "import megatron.core as mc\ng = mc.parallel_state.get_context_parallel_group()\n",
    "import megatron\ng = megatron.core.parallel_state.get_context_parallel_group()\n",
    "from megatron import core\ng = getattr(core, 'parallel_state')\n",
    "import importlib\nps = importlib.import_module('megatron.core.parallel_state')\n",
    "from megatron.core.process_groups_config import ProcessGroupCollection as P\n"
    "pgs = P.use_mpu_process_groups()\n",
    "def f(x):\n    return x.parallel_state\n",
]


@pytest.mark.parametrize("source", STRAY)
def test_scan_finds_a_parallel_state_read(source):
    assert violations(source)


def test_scan_leaves_groups_passed_as_arguments_alone():
    clean = (
        "import torch.distributed as dist\n"
        "from megatron.core.process_groups_config import ProcessGroupCollection\n"
        "from megatron_vlm.parallel.runtime import groups_or_default\n"
        "def f(t, pg_collection: ProcessGroupCollection | None = None):\n"
        "    '''Reduces over ``pg_collection.dp_cp`` (not megatron's parallel_state).'''\n"
        "    pgs = groups_or_default(pg_collection)\n"
        "    state = {'parallel': 1}\n"
        "    return dist.get_world_size(pgs.dp_cp), state\n"
    )
    assert violations(clean) == []


def test_init_distributed_returns_the_runtime(megatron_groups):
    """The runtime holds the groups megatron made (sizes and ranks read from torch's groups
    here), the device, and the model's kernel choice when asked; ``dp_size`` is the former
    return value."""
    import torch
    import torch.distributed as dist

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.vlm import kernel_choice
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes import get_recipe

    model = get_recipe("tiny_vlm_cpu").model
    runtime = init_distributed(ParallelConfig(), seed=1234, model=model)
    pgs = runtime.pg_collection
    assert runtime.dp_size == 1 and runtime.dp_rank == 0
    assert (runtime.rank, runtime.world_size) == (dist.get_rank(), dist.get_world_size())
    for name in ("tp", "pp", "mp", "cp", "tp_cp", "ep", "expt_tp", "tp_ep_pp", "tp_dp_cp", "dp",
                 "dp_cp", "expt_dp", "embd", "pos_embd"):
        group = getattr(pgs, name)
        assert dist.get_world_size(group) == 1 and dist.get_rank(group) == 0, name
    assert runtime.layout() == {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": 1, "dp": 1}
    assert runtime.device == torch.device("cpu")
    assert runtime.kernels == kernel_choice(model, ParallelConfig())
    assert init_distributed(ParallelConfig(), seed=1234).kernels is None


def test_training_passes_its_groups_down(tmp_path, monkeypatch, megatron_groups):
    """A run (tiny VLM: tower, projector, MoE LLM, QK-Clip, validation, a checkpoint and a resume)
    never falls back to the process's groups: every component received the runtime's."""
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.parallel import runtime as runtime_module
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.trainer import train

    asked = []

    def refuse():
        asked.append(True)
        raise AssertionError("a component was given no process groups")

    monkeypatch.setattr(runtime_module, "_initialised_groups", refuse)
    common = ["train.steps=2", "optim.warmup_steps=1", "train.eval_interval=0",
              "train.eval_batches=1", "train.log_interval=1", "train.tensorboard=false",
              "train.plot=false", "checkpoint.save_interval=1", "data.global_batch_size=2",
              "model.llm.log_max_attention_logit=true", f"train.output_dir={tmp_path}"]
    job = get_recipe("tiny_vlm_cpu")
    first = train(apply_overrides(job, [*common, "train.exit_after_steps=1"]))
    second = train(apply_overrides(job, [*common, "checkpoint.resume=true"]))
    assert first.state.step == 1 and second.state.step == 2 and not asked
