"""Build models and optimizers as one rank of a large job, in one process, for the planner tests.

torch's ``fake`` process-group backend (``torch.testing._internal.distributed.fake_pg``) lets
megatron-core initialise a world of any size in a single process; collectives return without
moving data. That is enough to *build* what a given rank of a 4..1,024-GPU layout holds:

* ``meta`` cases: this rank's model chunk on the meta device (names, shapes, dtypes);
* ``buffers`` cases: megatron DDP's buffers and the DistributedOptimizer / layer-wise optimizer's
  shards for the tiny model at DP > 1 (real CPU tensors; the shard assignment is pure rank
  arithmetic in megatron).

Usage: ``python fake_pg_worker.py CASES.json OUT.json``; each case is run in a fresh world.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

# Set before torch (and megatron) load: torch reads TORCH_COMPILE_DISABLE at import time and the
# imports below warn at import time, hence the E402 noqa on each of them.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402

from megatron_vlm.config import ParallelConfig, apply_overrides  # noqa: E402
from megatron_vlm.parallel.cpu_shims import apply_cpu_shims  # noqa: E402
from megatron_vlm.recipes import get_recipe  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _world(case: dict):
    from megatron.core import parallel_state

    dist.init_process_group(backend="fake", world_size=case["world"], rank=case["rank"],
                            store=FakeStore())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=case.get("tp", 1),
        pipeline_model_parallel_size=case.get("pp", 1),
        virtual_pipeline_model_parallel_size=case.get("vpp"),
        expert_model_parallel_size=case.get("ep", 1),
        expert_tensor_parallel_size=case.get("etp", case.get("tp", 1)),
        create_gloo_process_groups=False)
    return parallel_state


def _job(case: dict):
    return apply_overrides(get_recipe(case["recipe"]), case.get("overrides", []))


def _parallel(case: dict) -> ParallelConfig:
    tp = case.get("tp", 1)
    return ParallelConfig(tp=tp, pp=case.get("pp", 1), vpp=case.get("vpp"),
                          ep=case.get("ep", 1), etp=case.get("etp", tp),
                          sequence_parallel=tp > 1, pipeline_layout=case.get("layout"))


def meta_case(case: dict) -> list:
    """Names, shapes and dtypes of this rank's chunks, built on the meta device by the
    project's builders (``KimiVLM`` / ``build_llm``; ``pipeline_layout`` from the case)."""
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.models.param_count import allocate_on_meta
    from megatron_vlm.models.vlm import KimiVLM

    ps = _world(case)
    model_cfg, parallel = _job(case).model, _parallel(case)
    chunks = []
    vpp = case.get("vpp") or 1
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), case.get("pp", 1)
    for vp in range(vpp):
        first, last = pp_rank == 0 and vp == 0, pp_rank == pp - 1 and vp == vpp - 1
        vp_stage = vp if case.get("vpp") else None
        with allocate_on_meta():
            if model_cfg.is_vlm:
                model = KimiVLM(model_cfg, parallel, pre_process=first, post_process=last,
                                vp_stage=vp_stage)
            else:
                model = build_llm(model_cfg.llm, parallel, model_cfg.params_dtype,
                                  pre_process=first, post_process=last, vp_stage=vp_stage)
        chunks.append([[n, list(p.shape), DTYPES[p.dtype]] for n, p in model.named_parameters()])
    return chunks


def buffers_case(case: dict) -> dict:
    """The tiny model's DDP buffers and the optimizer's per-rank shards at this DP rank."""
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.training.model_setup import build_model_chunks

    ps = _world(case)
    # megatron's optimizer asks for gloo twins of the DP groups (used only to save/load its
    # state); the fake world has none, so hand it the (fake) DP groups themselves.
    ps.get_data_parallel_group_gloo = lambda with_context_parallel=False, **_: (
        ps.get_data_parallel_group(with_context_parallel=with_context_parallel))
    ps.get_expert_data_parallel_group_gloo = lambda **_: ps.get_expert_data_parallel_group()
    job = _job(case)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    out = {"dp": ps.get_data_parallel_world_size(with_context_parallel=True),
           "buffers": [[b.numel, str(b.param_dtype), bool(is_expert)]
                       for c in chunks
                       for is_expert, bufs in ((False, c.buffers),
                                               (True, c.expert_parallel_buffers))
                       for b in bufs]}
    deal = getattr(optimizer, "dp_cp_params_list", None)
    if deal:  # layer-wise: every DP rank's whole parameters (numels), megatron's deal
        out["layerwise"] = [[p.numel() for p in rank_params] for rank_params in deal]
    return out


def main() -> None:
    apply_cpu_shims()
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        fn = {"meta": meta_case, "buffers": buffers_case}[case["kind"]]
        results.append(fn(case))
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
