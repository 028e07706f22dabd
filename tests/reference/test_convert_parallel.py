"""Export from parallel layouts: a release-layout K2.5 checkpoint -> import (one process) ->
loaded and saved again by 2 gloo ranks under TP=2 + SP and under EP=2 -> export -> every tensor
bit-identical to the release files (names, shapes, dtypes, values). The TP=2 save pads the
vocabulary to 256 rows (128 x tp); export reads the saved shapes and cuts them back.

One torchrun spawn for both layouts (~20 s: process start-up and megatron import dominate).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import read_safetensors_dir, rekey_to_release
from safetensors.torch import save_file
from test_convert_kimi import build_hf

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def saved_in_parallel(megatron_groups, tmp_path_factory):
    from megatron_vlm.convert import import_hf

    tmp = tmp_path_factory.mktemp("parallel")
    build_hf(q_lora=16).save_pretrained(tmp / "saved")
    release = rekey_to_release(read_safetensors_dir(tmp / "saved"))
    (tmp / "release").mkdir()
    save_file(release, str(tmp / "release" / "model.safetensors"))
    (tmp / "release" / "config.json").write_text((tmp / "saved" / "config.json").read_text())
    src = import_hf(tmp / "release", tmp / "ours", progress=False).checkpoint
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "convert_parallel_worker.py"), str(src), str(tmp / "tp2"), str(tmp / "ep2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return tmp, release


@pytest.mark.parametrize("layout,tp,ep", [("tp2", 2, 1), ("ep2", 1, 2)])
def test_export_from_parallel_save_is_bit_identical(saved_in_parallel, layout, tp, ep):
    from megatron_vlm.checkpoint import read_manifest
    from megatron_vlm.convert import export_hf

    tmp, release = saved_in_parallel
    step = tmp / layout / "step_0000000"
    manifest = read_manifest(step)
    assert manifest["world_size"] == 2
    assert (manifest["layout"]["tp"], manifest["layout"]["ep"]) == (tp, ep)
    export_hf(tmp / layout, tmp / f"hf_{layout}", dtype="fp32", progress=False)
    exported = read_safetensors_dir(tmp / f"hf_{layout}")
    assert exported.keys() == release.keys()
    for k, v in release.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
