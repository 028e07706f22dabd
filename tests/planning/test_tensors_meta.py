"""The planner's per-rank parameter lists and shard arithmetic against megatron-core itself:
models built on the ``meta`` device as one rank of a 4..64-GPU layout (TP, EP, expert-TP, an
uneven interleaved pipeline), megatron DDP's buffer sizes with the DistributedOptimizer at DP=4,
and the LayerWiseDistributedOptimizer's deal of whole parameters over 4 DP ranks.

One subprocess builds everything under torch's ``fake`` process-group backend
(``fake_pg_worker.py``), so a 64-rank layout is built in a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_vlm.config import apply_overrides
from megatron_vlm.config.parallel import layers_from_layout
from megatron_vlm.planning.memory import TensorTable, ddp_buffers, layerwise_deal
from megatron_vlm.planning.tensors import chunk_tensors
from megatron_vlm.recipes import get_recipe

WORKER = Path(__file__).with_name("fake_pg_worker.py")
MOONLIGHT_LAYOUT = "Et*3|t*4|t*4|t*4|t*3|t*3|t*3|t*3,L"  # pp=4, vpp=2, 27 layers
# The recipe recomputes the expert activation, which megatron allows only with grouped expert
# GEMMs (an H100 has them; this CPU build of the bf16 model does not). Shapes do not change.
NO_MOE_ACT = ["model.llm.recompute=none"]
#: The tiny Keye recipe's LLM alone as an MoE GQA model with a qkv bias.
TEXT_MOE_GQA = ["model.vision=null", "model.projector=null", "data.multimodal=null",
                "model.params_dtype=bf16", "model.llm.num_experts=4",
                "model.llm.moe_ffn_hidden_size=32", "model.llm.num_dense_layers=1",
                "model.llm.moe_router_topk=2", "model.llm.add_qkv_bias=true"]

CASES = [
    # The tiny VLM as rank 0 of TP=2 x EP=2 (bf16) and rank 3 of TP=2 x EP=4 x ETP=2 (fp32).
    {"kind": "meta", "recipe": "tiny_vlm_cpu", "world": 4, "rank": 0, "tp": 2, "ep": 2, "etp": 1,
     "overrides": ["model.params_dtype=bf16"]},
    {"kind": "meta", "recipe": "tiny_vlm_cpu", "world": 8, "rank": 3, "tp": 2, "ep": 4, "etp": 2},
    # Real-size Kimi-VL-A3B (Moonlight-16B-A3B, with MoonViT when the recipe is a VLM), TP=2 x EP=8.
    {"kind": "meta", "recipe": "kimi_vl_a3b", "world": 16, "rank": 5, "tp": 2, "ep": 8,
     "etp": 1, "overrides": NO_MOE_ACT},
    # An uneven interleaved pipeline (parallel.pipeline_layout): pp ranks 0 (ViT, embedding and
    # layers 0-2, then 15-17) and 3 (layers 12-14, then 24-26 and the head) of 64 GPUs.
    {"kind": "meta", "recipe": "kimi_vl_a3b", "world": 64, "rank": 0, "tp": 2, "ep": 8,
     "etp": 1, "pp": 4, "vpp": 2, "layout": MOONLIGHT_LAYOUT, "overrides": NO_MOE_ACT},
    {"kind": "meta", "recipe": "kimi_vl_a3b", "world": 64, "rank": 48, "tp": 2, "ep": 8,
     "etp": 1, "pp": 4, "vpp": 2, "layout": MOONLIGHT_LAYOUT, "overrides": NO_MOE_ACT},
    # GQA (the tiny Keye LLM, text-only, MoE, qkv bias): linear_qkv split by whole query
    # groups, q/k norms whole, as ranks 1 and 3 of TP=2 x EP=2 (ETP 1 and 2).
    {"kind": "meta", "recipe": "tiny_keye_cpu", "world": 4, "rank": 1, "tp": 2, "ep": 2,
     "etp": 1, "overrides": TEXT_MOE_GQA},
    {"kind": "meta", "recipe": "tiny_keye_cpu", "world": 4, "rank": 3, "tp": 2, "ep": 2,
     "etp": 2, "overrides": TEXT_MOE_GQA},
    # DDP buffers and optimizer shards of the tiny VLM at DP=4 (EP=2 adds expert buffers).
    {"kind": "buffers", "recipe": "tiny_vlm_cpu", "world": 4, "rank": 1,
     "overrides": ["parallel.use_distributed_optimizer=true", "model.params_dtype=bf16"]},
    {"kind": "buffers", "recipe": "tiny_vlm_cpu", "world": 4, "rank": 2, "ep": 2, "etp": 1,
     "overrides": ["parallel.use_distributed_optimizer=true", "parallel.ep=2",
                   "parallel.etp=1"]},
    {"kind": "buffers", "recipe": "tiny_vlm_cpu", "world": 4, "rank": 1,
     "overrides": ["parallel.use_distributed_optimizer=true", "model.params_dtype=bf16",
                   "optim.optimizer=muon"]},
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> list:
    tmp = tmp_path_factory.mktemp("fake_pg")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp / "cases.json"), str(tmp / "out.json")],
        capture_output=True, text=True, timeout=600, env=env, check=False,
        cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def _job(case: dict):
    return apply_overrides(get_recipe(case["recipe"]), case.get("overrides", []))


def _planned(case: dict) -> list[list]:
    model = _job(case).model
    tp, ep, pp, vpp = case.get("tp", 1), case.get("ep", 1), case.get("pp", 1), case.get("vpp")
    etp = case.get("etp", tp)
    if case.get("layout") is None:
        layers = [range(model.llm.num_layers)]
        spans = [(0, True, True)]
    else:
        sizes = layers_from_layout(case["layout"])
        pp_rank = case["rank"] // (case["world"] // pp)
        starts = np.cumsum([0, *sizes])
        stages = [k for k in range(len(sizes)) if k % pp == pp_rank]
        layers = [range(starts[k], starts[k] + sizes[k]) for k in stages]
        spans = [(k, k == 0, k == len(sizes) - 1) for k in stages]
    assert len(layers) == (vpp or 1)
    return [[[t.name, list(t.shape), t.dtype]
             for t in chunk_tensors(model, lay, first=first, last=last, tp=tp, ep=ep, etp=etp)]
            for lay, (_, first, last) in zip(layers, spans)]


@pytest.mark.parametrize("index", [i for i, c in enumerate(CASES) if c["kind"] == "meta"])
def test_rank_tensors_equal_meta_builds(built, index) -> None:
    case = CASES[index]
    expected = _planned(case)
    assert built[index] == expected  # names, shapes, dtypes, module order, per chunk


@pytest.mark.parametrize("index", [i for i, c in enumerate(CASES) if c["kind"] == "buffers"])
def test_buffers_and_layerwise_deal_equal_megatron(built, index) -> None:
    case = CASES[index]
    job = _job(case)
    got = built[index]
    dp = got["dp"]
    ep = job.parallel.ep
    expert_dp = case["world"] // (ep * (job.parallel.etp or job.parallel.tp))
    table = TensorTable.of(chunk_tensors(job.model, range(job.model.llm.num_layers), first=True,
                                         last=True, tp=job.parallel.tp, ep=ep,
                                         etp=job.parallel.etp))
    muon = job.optim.optimizer == "muon"
    distributed = job.parallel.use_distributed_optimizer and not muon
    planned = sorted([size, "torch.bfloat16" if nbytes == 2 else "torch.float32", expert]
                     for expert, nbytes, size, _ in ddp_buffers(table, dp, expert_dp,
                                                                distributed))
    assert sorted(got["buffers"]) == planned
    if distributed:
        assert all(size % np.lcm(dp if not expert else expert_dp, 128) == 0
                   for size, _, expert in got["buffers"])
    if muon:
        dense = table.select(table.trainable & ~table.expert)
        order, ranks = layerwise_deal(dense, dp, "muon", job.optim.muon_router)
        numel = dense.numel[order]
        mine = [sorted(numel[ranks == r].tolist()) for r in range(dp)]
        assert [sorted(r) for r in got["layerwise"]] == mine
        assert len({len(r) for r in mine}) > 1 or len(mine[0]) > 1
