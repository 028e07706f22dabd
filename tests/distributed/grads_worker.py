"""Worker for test_layout_grads.py: one forward-backward of the tiny LLM on the bundled data,
then every gradient gathered to its full (unsharded) shape and saved by rank 0.

Run as ``python -m torch.distributed.run ... grads_worker.py OUT INIT override...``: when the
checkpoint INIT exists the model loads it (resharding to this layout), otherwise the freshly
initialised model is saved there first -- so every layout starts from the same weights (expert
init draws per-EP-rank RNG, so a shared seed is not enough).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint
from megatron_vlm.config import apply_overrides
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.data_setup import build_data
from megatron_vlm.training.model_setup import build_model_chunks, unwrap
from megatron_vlm.training.trainer import run_forward_backward


def full_grad(name: str, param: torch.nn.Parameter, gated: bool = True) -> torch.Tensor:
    grad = param.main_grad.detach().clone()
    if (getattr(param, "tensor_model_parallel", False)
            and parallel_state.get_tensor_model_parallel_world_size() > 1):
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, grad, group=group)
        if name.endswith("linear_fc1.weight") and gated:
            # Each rank holds [gate_shard; up_shard]: regroup into [gate; up].
            halves = [p.chunk(2, dim=0) for p in parts]
            parts = [h[0] for h in halves] + [h[1] for h in halves]
        grad = torch.cat(parts, dim=param.partition_dim)
    return grad


def global_name(name: str, expert_offset: int, layer_offset: int) -> str:
    """Local names -> global ones: ``local_experts.{i}`` under expert parallelism and
    ``decoder.layers.{i}`` under pipeline parallelism."""
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers."):].split(".", 1)
        name = f"decoder.layers.{layer_offset + int(local)}.{rest}"
    if ".local_experts." not in name:
        return name
    head, tail = name.split(".local_experts.")
    local, rest = tail.split(".", 1)
    return f"{head}.local_experts.{expert_offset + int(local)}.{rest}"


def main() -> None:
    out, init, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    job = apply_overrides(get_recipe("tiny_text_cpu"),
                          [f"train.output_dir={out.parent}", *overrides])
    runtime = init_distributed(job.parallel, job.train.seed)
    data = build_data(job, dp_rank=runtime.dp_rank, dp_size=runtime.dp_size,
                      run_dir=out.parent)
    chunks = build_model_chunks(job)
    num_local = job.model.llm.num_experts // job.parallel.ep
    offset = parallel_state.get_expert_model_parallel_rank() * num_local
    if (init / "manifest.json").exists():
        load_checkpoint(init, chunks, None, None, load_optimizer=False)
    else:
        save_checkpoint(init.parent, 0, chunks, None, None, {}, job.to_yaml())
    total = run_forward_backward(chunks, data.loader.next_global_batch(), job.data.seq_length,
                                 forward_only=False)
    layer_offset = get_transformer_layer_offset(unwrap(chunks[0]).config)
    grads = {global_name(name, offset, layer_offset): full_grad(name, p)
             for name, p in unwrap(chunks[0]).named_parameters()}
    # Expert-parallel ranks hold different experts: merge every rank's dictionary.
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, grads)
    grads = {k: v for part in parts for k, v in part.items()}
    if dist.get_rank() == 0:
        torch.save({"loss": total, "grads": grads}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
