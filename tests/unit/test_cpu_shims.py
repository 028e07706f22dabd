"""Issue 16 item 7: the start-up shims are listed, and can be undone.

``cpu_shims.SHIMS`` lists every megatron/torch symbol the shims rebind with the megatron-core
0.16.1 lines it covers. Checked here: each listed line exists in the installed megatron-core and
mentions the symbol (an upgrade that moves or drops it fails here: revisit that shim); the
symbols whose value ``apply_cpu_shims`` really changes -- found by diffing every loaded torch/
megatron module, not by asking the shim code -- are exactly the table; ``destroy_distributed``
puts every one back (the original object) and leaves the CUDA-to-CPU mode; a new
``init_distributed`` installs them again. The MLA ``Linear`` rebind happens at start-up, not
when a spec is built.

The install/undo cycle runs in a fresh interpreter (it tears down process groups, and the
first install must see torch/megatron untouched).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _megatron_core() -> Path:
    import megatron.core

    return Path(megatron.core.__file__).parent


def test_megatron_core_is_the_version_the_table_names():
    from megatron.core.package_info import __version__

    assert __version__ == "0.16.1", "megatron-core changed: revisit every entry of cpu_shims.SHIMS"


def test_every_covered_line_exists_and_mentions_its_symbol():
    from megatron_vlm.parallel.cpu_shims import SHIMS

    core = _megatron_core()
    assert len({(s.target, s.attr) for s in SHIMS}) == len(SHIMS)
    for shim in SHIMS:
        refs = re.findall(r"([\w/]+\.py):([\d,]+)", shim.covers)
        assert refs, f"{shim.target}.{shim.attr}: no megatron file:line in {shim.covers!r}"
        for path, lines in refs:
            text = (core / path).read_text().splitlines()
            for n in map(int, lines.split(",")):
                line = text[n - 1] if n <= len(text) else ""
                assert (shim.token or shim.attr) in line, (
                    f"{shim.target}.{shim.attr}: megatron/core/{path}:{n} is now {line.strip()!r}")


def _worker() -> None:
    """Fresh interpreter: snapshot torch/megatron, install, diff, destroy, re-init."""
    import torch
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    from megatron.core.tensor_parallel import random  # noqa: F401
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils, token_dispatcher  # noqa: F401
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._config_module import ConfigModule

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.linear import DuplicatedLinear
    from megatron_vlm.parallel import cpu_shims
    from megatron_vlm.parallel.init import destroy_distributed, init_distributed

    def attrs(obj) -> dict:
        if isinstance(obj, ConfigModule):  # torch's config modules keep values aside
            return {k: getattr(obj, k) for k in obj.get_config_copy()}
        try:
            return dict(vars(obj))
        except TypeError:  # not a module (a torch.ops namespace ...): nothing to rebind
            return {}

    owners = {n: m for n, m in sys.modules.items()
              if m is not None and n.split(".")[0] in ("torch", "megatron")}
    owners["torch.Tensor"] = torch.Tensor
    before = {n: attrs(m) for n, m in owners.items()}

    def changed() -> list[list[str]]:
        out = []
        for name, old in before.items():
            now = attrs(owners[name])
            for attr in old.keys() | now.keys():
                if old.get(attr, before) is not now.get(attr, before):
                    out.append([name, attr])
        return sorted(out)

    def current(target: str, attr: str):
        return attrs(owners[target]).get(attr, before)

    def ours(value) -> bool:
        """Defined in our package (``functools.wraps`` copies ``__module__``, not the code)."""
        code = getattr(value, "__code__", None)
        return (getattr(value, "__module__", None) or "").startswith("megatron_vlm") or (
            code is not None and "megatron_vlm" in code.co_filename)

    def left_over() -> list[list[str]]:
        """Table symbols not back to their original object, and anything of ours still bound
        in a torch/megatron module (process-group state that destroy resets is neither)."""
        table = {(s.target, s.attr) for s in cpu_shims.SHIMS}
        return [[n, a] for n, a in changed()
                if (n, a) in table or ours(current(n, a))]

    def all_patched() -> bool:
        return all(current(s.target, s.attr) is not before[s.target].get(s.attr, before)
                   for s in cpu_shims.SHIMS)

    def mode_on() -> bool:
        return any(type(m).__name__ == "_CudaToCpuMode" for m in _get_current_function_mode_stack())

    report: dict = {"mla_linear_at_import": mla.Linear is DuplicatedLinear}
    cpu_shims.apply_cpu_shims()
    report["changed_by_apply"] = changed()
    report["registry"] = sorted(map(list, cpu_shims.patched_symbols()))
    report["mla_linear_after_apply"] = mla.Linear is DuplicatedLinear
    report["env_after_apply"] = os.environ.get("TORCH_COMPILE_DISABLE")
    init_distributed(ParallelConfig(), seed=0)
    report["init_patched"] = all_patched() and mode_on()
    destroy_distributed()
    report["left_after_destroy"] = left_over()
    report["mode_after_destroy"] = mode_on()
    report["env_after_destroy"] = os.environ.get("TORCH_COMPILE_DISABLE")
    init_distributed(ParallelConfig(), seed=0)
    report["reinit_patched"] = all_patched() and mode_on()
    report["reinit_mla_linear"] = mla.Linear is DuplicatedLinear
    destroy_distributed()
    report["left_after_second_destroy"] = left_over()
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def cycle() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "worker"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def test_what_apply_changes_is_exactly_the_table(cycle):
    from megatron_vlm.parallel.cpu_shims import SHIMS

    table = sorted([s.target, s.attr] for s in SHIMS)
    assert cycle["changed_by_apply"] == table
    assert cycle["registry"] == table
    assert cycle["env_after_apply"] == "1"


def test_destroy_distributed_restores_every_symbol_and_init_reapplies(cycle):
    assert cycle["init_patched"]
    assert cycle["left_after_destroy"] == [] and not cycle["mode_after_destroy"]
    assert cycle["env_after_destroy"] is None
    assert cycle["reinit_patched"] and cycle["left_after_second_destroy"] == []


def test_mla_linear_is_rebound_at_start_up_not_by_a_spec(cycle):
    assert not cycle["mla_linear_at_import"]
    assert cycle["mla_linear_after_apply"] and cycle["reinit_mla_linear"]


def test_local_spec_refuses_without_the_start_up_shims(monkeypatch):
    """Building the local MLA spec no longer rebinds megatron: without the shims it refuses."""
    from megatron.core.transformer import multi_latent_attention as mla

    from megatron_vlm.models import specs

    monkeypatch.setattr(mla, "Linear", None)
    with pytest.raises(RuntimeError, match="init_distributed"):
        specs._require_mla_duplicated_linear()
    assert mla.Linear is None


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
