"""Two slices write the same checkpoint as one process: import -> the same tensors (each slice
writes its own ``.distcp`` files, joined into one checkpoint our loader reads), export ->
byte-identical HF shards and index; and the round trip returns the input's bits (read back with
the safetensors library, not our reader).

The slices run here one after the other, in this process (what each ``--workers`` process or
SLURM array task runs: ``import_slice`` / ``export_slice``, then ``finish_*``); the export also
runs once through ``--workers 2`` (spawned processes) to cover the spawning.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _tensors(step_dir):
    from megatron_vlm.checkpoint.manifest import read_manifest
    from megatron_vlm.convert.importer import load_job_model
    from megatron_vlm.convert.mcore import (
        SHARDED_METADATA,
        CheckpointReader,
        build_meta_model,
        tensor_slots,
    )

    model = load_job_model(read_manifest(step_dir)["config_yaml"])
    slots = tensor_slots(build_meta_model(model).sharded_state_dict(
        metadata=dict(SHARDED_METADATA)))
    return CheckpointReader(step_dir, slots).read(list(slots))


def test_two_workers_write_what_one_writes(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.convert_hf import generate, synthetic_config
    from megatron_vlm.checkpoint.manifest import verify_checkpoint
    from megatron_vlm.convert import export_hf, import_hf
    from megatron_vlm.convert.importer import finish_import, import_slice

    hf = tmp_path / "hf"
    generate(hf, synthetic_config(0.001, smoke=True), shard_bytes=300_000)
    one = import_hf(hf, tmp_path / "one", params_dtype="bf16", progress=False)
    for i in (1, 0):  # any order, any process
        import_slice(hf, tmp_path / "two", i, 2, params_dtype="bf16")
    two = finish_import(hf, tmp_path / "two", 2, params_dtype="bf16")
    files = sorted(p.name for p in two.checkpoint.glob("*.distcp"))
    assert {f.split("_")[2] for f in files} == {"0", "1"}  # __<slice>_<thread>.distcp
    verify_checkpoint(two.checkpoint, full=True)  # the digests taken while writing hold
    a, b = _tensors(one.checkpoint), _tensors(two.checkpoint)
    assert a.keys() == b.keys() and len(a) == one.num_tensors
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    shard = 120_000
    x = export_hf(one.checkpoint, tmp_path / "x", max_shard_bytes=shard, progress=False)
    from megatron_vlm.convert.exporter import export_slice, finish_export

    for i in (1, 0):
        export_slice(two.checkpoint, tmp_path / "y", i, 2, max_shard_bytes=shard)
    y = finish_export(two.checkpoint, tmp_path / "y", 2, max_shard_bytes=shard)
    shards = sorted(p.name for p in x.out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(p.name for p in y.out.glob("*.safetensors"))
    for name in shards + ["model.safetensors.index.json"]:
        assert (x.out / name).read_bytes() == (y.out / name).read_bytes(), name
    source = {}
    for p in hf.glob("*.safetensors"):
        source.update(load_file(p))
    exported = {}
    for name in shards:
        exported.update(load_file(y.out / name))
    assert exported.keys() == source.keys()
    for k, v in source.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k


def test_run_slices_spawns_one_process_per_slice_and_reports_errors(tmp_path):
    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.convert.workers import run_slices

    fn = "convert_worker_stub:write_marker"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    run_slices(fn, [[str(tmp_path), i, 3] for i in range(3)], {})
    pids = {(tmp_path / f"slice_{i}_of_3").read_text() for i in range(3)}
    assert len(pids) == 3 and str(os.getpid()) not in pids
    with pytest.raises(ConversionError, match="slice 1 cannot read its shard"):
        run_slices(fn, [[str(tmp_path), i, 2] for i in range(2)], {"fail_at": 1})


def test_slurm_array_scripts_slice_then_finish(tmp_path, capsys):
    import subprocess

    from tiny_runs import load_tool

    cli = load_tool("convert_hf")
    out = tmp_path / "ours"
    assert cli.main(["import", str(tmp_path / "hf"), str(out), "--slurm-array", "3",
                     "--slurm-partition", "cpu", "--dry-run"]) == 0
    array, finish = capsys.readouterr().out.split("# --- then")
    assert "#SBATCH --array=0-2" in array and "#SBATCH --partition=cpu" in array
    assert f'import {tmp_path / "hf"} {out} ' in array
    assert '--slice "${SLURM_ARRAY_TASK_ID:?an array task (sbatch --array)}/3"' in array
    assert "--finish 3" in finish and "--array" not in finish
    for script in (array, finish.split("\n", 1)[1]):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
