"""Shared pieces of the VLM layout workers: the packed multimodal micro-batches, routing capture,
and whole (unsharded, globally named) parameters and gradients gathered from any layout.

The batches are built deterministically with the data pipeline's own packer (``pack_documents``)
plus media (SPEC §11): text, images of different sizes and 6-frame videos (MoonViT-3D chunks of
4 + 2 frames), padded to multiples of 8 (= 2*cp*tp up to cp = tp = 2) in a sequence of 128.
The vocabulary (1152, the tiny recipe's) is not a multiple of 128 x tp: Megatron-LM would pad it
to 1280 at TP=2 and let the padded logits into the softmax; ours pads to lcm(128, tp) (1152 in
every layout here) and masks padded logits, so every layout computes the same loss.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.data.packing import pack_documents
from megatron_vlm.training.model_setup import unwrap

SEQ = 128
PAD_TO = 8
PLACEHOLDER = 1001
PAD_ID = 0
VOCAB = 1152

# One micro-batch per entry: documents of ("text", n) and ("media", [(t, h, w) per chunk]).
VIDEO_4x4 = [(4, 4, 4), (2, 4, 4)]  # 6 frames -> chunks of 4 + 2 frames
VIDEO_2x6 = [(4, 2, 6), (2, 2, 6)]
MICRO_BATCHES = [
    [[("text", 6), ("media", [(1, 4, 6)]), ("text", 9)],
     [("text", 3), ("media", VIDEO_4x4), ("text", 12)],
     [("text", 40)]],
    # One item: under TP=2 split mode one rank encodes nothing for this micro-batch.
    [[("text", 4), ("media", [(1, 6, 4)]), ("text", 10)],
     [("text", 60)]],
    [[("text", 50)], [("text", 45)]],  # text only
    [[("text", 2), ("media", VIDEO_2x6), ("text", 20)],
     [("media", [(1, 4, 4)]), ("text", 30)],
     [("text", 3), ("media", [(1, 2, 2)]), ("text", 26)]],
]


def make_batch(docs: list, seed: int) -> PackedBatch:
    """One packed micro-batch from a document description (see ``MICRO_BATCHES``)."""
    g = torch.Generator().manual_seed(seed)
    token_docs, grids, starts, is_video, media_index = [], [], [], [], []
    placeholder_rel: list[list[int]] = []
    num_media = 0
    for doc in docs:
        ids: list[int] = []
        rel: list[int] = []
        for kind, what in doc:
            if kind == "text":
                ids += torch.randint(3, 1000, (what,), generator=g).tolist()
                continue
            for t, h, w in what:
                rel.append(len(ids))
                grids.append((t, h, w))
                is_video.append(len(what) > 1)
                media_index.append(num_media)
                ids += [PLACEHOLDER] * (h * w // 4)
            num_media += 1
        token_docs.append(ids)
        placeholder_rel.append(rel)
    batch = pack_documents(token_docs, SEQ, PAD_ID, PAD_TO)
    doc_starts = batch.cu_seqlens_padded.tolist()
    for d, rel in enumerate(placeholder_rel):
        starts += [doc_starts[d] + r for r in rel]
    # No loss on placeholders, nor on predicting one.
    media = batch.tokens == PLACEHOLDER
    batch.loss_mask[media] = 0.0
    batch.loss_mask[:, :-1][media[:, 1:]] = 0.0
    if grids:
        grid = torch.tensor(grids, dtype=torch.long)
        pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14, generator=g)
        batch.vision = VisionInputs(
            pixel_values=pixels, grid_thw=grid, placeholder_starts=torch.tensor(starts),
            is_video=torch.tensor(is_video), media_index=torch.tensor(media_index))
    return batch


def all_batches() -> list[PackedBatch]:
    return [make_batch(docs, seed=100 + i) for i, docs in enumerate(MICRO_BATCHES)]


def my_batches(batches: list[PackedBatch]) -> tuple[list[int], list[PackedBatch]]:
    """This DP rank's contiguous share of the global batch, with the global micro-batch ids."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = len(batches) // dp
    ids = list(range(rank * n, (rank + 1) * n))
    return ids, [batches[i] for i in ids]


# --- routing ------------------------------------------------------------------------------------


class RoutingRecorder:
    """Forward hooks on every MoE router: the routing map ``[local tokens, experts]`` of each
    forward, in call order, keyed by the global layer index."""

    def __init__(self, chunks: list) -> None:
        self.records: list[tuple[int, torch.Tensor]] = []
        self.handles = []
        for chunk in chunks:
            model = unwrap(chunk)
            offset = get_transformer_layer_offset(model.config)
            for name, module in model.named_modules():
                if isinstance(module, TopKRouter):
                    local = int(name.split("decoder.layers.")[1].split(".")[0])
                    self.handles.append(module.register_forward_hook(self._hook(local + offset)))

    def _hook(self, layer: int):
        def hook(module, args, output) -> None:
            self.records.append((layer, output[1].detach().clone()))
        return hook

    def gathered(self, micro_batch_ids: list[int]) -> dict[tuple[int, int], torch.Tensor]:
        """``{(micro-batch, layer): routing map [S, experts]}`` over all ranks (on every rank).

        Forwards run in micro-batch order on every stage (recompute off), so the k-th record of
        a layer belongs to this rank's k-th micro-batch; sequence-parallel shards are joined in
        TP rank order."""
        seen: dict[int, int] = {}
        mine = {}
        for layer, routing in self.records:
            k = seen.get(layer, 0)
            seen[layer] = k + 1
            mine[(micro_batch_ids[k], layer, ps.get_tensor_model_parallel_rank())] = routing
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        shards: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        for part in parts:
            for (mb, layer, tp_rank), routing in part.items():
                prev = shards.setdefault((mb, layer), {}).get(tp_rank)
                if prev is not None and not torch.equal(prev, routing):
                    raise AssertionError(f"replicas disagree on routing of {mb, layer}")
                shards[(mb, layer)][tp_rank] = routing
        return {key: torch.cat([by_rank[r] for r in sorted(by_rank)])
                for key, by_rank in shards.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --- whole tensors under any layout ---------------------------------------------------------------


def _full(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the parameter or its gradient on this rank) unsharded over TP / expert TP."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    expert = not getattr(param, "allreduce", True)
    group = (ps.get_expert_tensor_parallel_group() if expert
             else ps.get_tensor_model_parallel_group())
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    if name.endswith("linear_fc1.weight") and name.startswith("language_model."):
        # SwiGLU: each rank holds [gate_shard; up_shard]; regroup into [gate; up].
        halves = [p.chunk(2, dim=0) for p in parts]
        parts = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(parts, dim=param.partition_dim)


def global_name(name: str, layer_offset: int, expert_offset: int) -> str:
    """Local names -> global ones (pipeline layer index, expert index)."""
    marker = "decoder.layers."
    if marker in name:
        head, tail = name.split(marker, 1)
        local, rest = tail.split(".", 1)
        name = f"{head}{marker}{layer_offset + int(local)}.{rest}"
    if ".local_experts." in name:
        head, tail = name.split(".local_experts.", 1)
        local, rest = tail.split(".", 1)
        name = f"{head}.local_experts.{expert_offset + int(local)}.{rest}"
    return name


def gather_dp_sharded_grads(chunks: list) -> None:
    """Under the DistributedOptimizer each DP rank holds only its reduce-scattered shard of the
    gradient buffers (megatron ``param_and_grad_buffer.py:437``); all-gather the shards so every
    ``main_grad`` is whole again (a read-out for the test, after the step's gradients)."""
    for chunk in chunks:
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            if not group.ddp_config.use_distributed_optimizer:
                continue
            comm = group.intra_distributed_optimizer_instance_group
            size = dist.get_world_size(comm)
            for bucket in group.buckets:
                shards = list(bucket.grad_data.view(size, -1))
                mine = shards[dist.get_rank(comm)].clone()
                dist.all_gather(shards, mine, group=comm)


def whole(chunks: list, what: str) -> dict[str, torch.Tensor]:
    """Every parameter (``what='param'``) or gradient (``'grad'``) of the model, unsharded and
    globally named, merged over all ranks (on every rank)."""
    num_experts = unwrap(chunks[0]).config.num_moe_experts or 0
    expert_offset = ps.get_expert_model_parallel_rank() * (
        num_experts // ps.get_expert_model_parallel_world_size())
    mine = {}
    for chunk in chunks:
        model = unwrap(chunk)
        layer_offset = get_transformer_layer_offset(model.config)
        for name, p in model.named_parameters():
            value = p.detach() if what == "param" else p.main_grad.detach()
            mine[global_name(name, layer_offset, expert_offset)] = _full(name, p, value.clone())
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf when the shapes differ)."""
    if got.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def item_keys(batches) -> list[tuple]:
    """(t, h, w, pixel sum) of every media item, as MoonViT's item log records them."""
    keys = []
    for b in batches:
        if b.vision is not None:
            sums = b.vision.pixel_values.double().split(b.vision.grid_thw.prod(dim=1).tolist())
            keys += [(*map(int, g), float(x.sum())) for g, x in zip(b.vision.grid_thw.tolist(),
                                                                    sums)]
    return keys


def gather_item_logs(vit, batches: list[PackedBatch], vision_mode: str) -> list[dict]:
    """Every rank's encoder item log of this step (``vit`` None off the first stage): its ranks,
    the media items it was given and those its vision tower encoded."""
    mine = {"tp_rank": ps.get_tensor_model_parallel_rank(),
            "cp_rank": ps.get_context_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "vision_mode": vision_mode,
            "expected": item_keys(batches) if vit is not None else [],
            "encoded": list(vit.encoded_item_log) if vit is not None else []}
    logs: list = [None] * dist.get_world_size()
    dist.all_gather_object(logs, mine)
    return logs


def save_results(results: dict, path: Path, t0: float) -> float:
    """Rank 0 saves ``results`` (with the seconds since ``t0``) to ``path``; all ranks wait.
    Returns the seconds."""
    results["seconds"] = time.perf_counter() - t0
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.barrier()
    return results["seconds"]
