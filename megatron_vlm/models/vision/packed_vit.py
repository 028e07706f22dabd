"""What the packed NaViT towers share: MoonViT (``moonvit.py``) and Keye's SigLIP tower
(``families/keye/vision.py``).

A tower packs the media of a micro-batch into one THD sequence of attention *segments* rows
``(t, h, w)`` of :meth:`PackedViT.segments` (MoonViT: one per item, ``t*h*w`` patches; Keye: one
per frame, ``h*w``) and merges each segment's features on its own. :class:`PackedViT` holds the
patch embedding, the encoder, the encode path (embed, position table, padding for sequence
parallelism, encoder, gather), the split-mode forward (segments shared out over the split group,
``parallel/vision_split.py``) and the checkpoint replica ids; a tower supplies its layer spec,
position table, rotary angles, segmentation and frame limit. :func:`tower_groups` is the
process-group set-up of both build functions (TP ``split`` / ``tp`` mode, CP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.models.attention import thd_packed_seq_params
from megatron_vlm.models.specs import KernelChoice, vit_modules
from megatron_vlm.models.vision.merger import tpool_patch_merger
from megatron_vlm.parallel.runtime import groups_or_default
from megatron_vlm.parallel.vision_split import (
    assign_items,
    gather_items,
    item_costs,
    mark_replicated,
    replica_process_groups,
    set_replica_ids,
)


def check_grid(grid_thw: Tensor, num_patches: int, max_frames: int) -> None:
    """Raise ``ValueError`` when ``grid_thw [M, 3]`` cannot describe ``num_patches`` patches."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"grid_thw must be [M >= 1, 3] (t, h, w); got {tuple(grid_thw.shape)}")
    if bool((grid_thw < 1).any()):
        raise ValueError(f"grid_thw entries must be >= 1; got {grid_thw.tolist()}")
    if int(grid_thw[:, 0].max()) > max_frames:
        raise ValueError(
            f"an item has t={int(grid_thw[:, 0].max())} frames; video chunks hold at most "
            f"temporal_patch_size={max_frames}"
        )
    total = int(grid_thw.prod(dim=1).sum())
    if total != num_patches:
        raise ValueError(
            f"grid_thw describes {total} patches (sum of t*h*w) but pixel_values has {num_patches}"
        )


def packed_seq_params(lengths: Tensor, pad: int, device: torch.device) -> PackedSeqParams:
    """THD parameters: one document per segment (``lengths`` patches, bidirectional); ``pad``
    tail tokens become one empty document (real length 0, padded length ``pad``)."""
    cu = F.pad(lengths.cumsum(0), (1, 0))
    return thd_packed_seq_params(cu, cu, int(cu[-1]) + pad, device)


class PackedViT(MegatronModule):
    """A packed NaViT tower: ``patch_embed`` (Conv2d) -> + ``pos_embed`` -> ``encoder``
    (megatron ``TransformerBlock`` with a final norm) -> per-segment 2x2 (x t) merge.

    A subclass sets :attr:`layer_spec`, :attr:`kernel_choice`, :attr:`max_frames` and defines
    :meth:`position_table` and :meth:`rope_angles` (and :meth:`segments` if a segment is not an
    item, :meth:`patch_embedding` if a patch is not one Conv2d). ``vision`` is the tower's
    config (MoonViT's ``VisionConfig`` or a family's): fields ``in_channels``,
    ``hidden_size``, ``ffn_hidden_size``, ``patch_size``, ``num_layers``,
    ``merge_kernel_height/width``, ``merge_size`` are read here.
    """

    layer_spec: Callable[[KernelChoice], ModuleSpec]
    """One encoder layer's spec for a kernel choice."""
    kernel_choice: Callable[[Any, str], KernelChoice]
    """``(vision, params_dtype)`` -> the kernel choice of a tower built without one."""
    max_frames: int
    """Most frames ``t`` of one ``grid_thw`` row (:func:`check_grid`)."""

    def __init__(
        self, config: TransformerConfig, vision: Any, pg_collection=None,
        choice: KernelChoice | None = None, split_group=None, split_reduce_group=None,
        replica_group=None,
    ) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.split_group = split_group
        """The ranks sharing this micro-batch's segments, each encoding its share: split mode the
        TP group (TP x CP under context parallelism; the tower is replicated there, built with
        ``replica_process_groups``), ``tp`` mode under CP the CP group. None: encode every
        segment."""
        self.split_reduce_group = split_reduce_group
        """The CP group under context parallelism: the gather's backward sums over it."""
        self.replica_group = replica_group
        """Split mode under TP: the TP group the tower is replicated over (its parameters are
        marked replicated, and checkpoint shards get one main replica per TP group). None:
        megatron's own replica ids."""
        self.num_encoded_items = 0
        """Segments this rank has run through :meth:`encode` (activation recompute not
        counted)."""
        self.encoded_item_log: list[tuple[int, int, int, float]] | None = None
        """Test-only: when set to a list, :meth:`encode` appends ``(t, h, w, pixel sum)`` of
        every segment it encodes."""
        if choice is None:
            choice = self.kernel_choice(vision, "bf16" if config.bf16 else "fp32")
        # Built in this order (patch conv, position table, encoder): parameter init draws from
        # the RNG in it.
        self.patch_embed = self.patch_embedding()
        self.pos_embed = self.position_table()
        self.encoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(
                layer_specs=[self.layer_spec(choice)] * vision.num_layers,
                layer_norm=vit_modules(choice).final_norm,
            ),
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
            pg_collection=groups_or_default(pg_collection, required=True),
        )
        self.tp_group = self.encoder.tp_group
        if replica_group is not None:
            mark_replicated(self)

    def patch_embedding(self) -> torch.nn.Module:
        """The ``patch_embed`` module: ``patch_embed(pixel_values) -> [N, D, ...]`` (flattened
        after it) with a ``weight`` (its dtype and device are the tower's); a per-patch Conv2d
        (GLM's tower: a Conv3d over 2 frames and an RMSNorm)."""
        vision = self.vision
        return torch.nn.Conv2d(vision.in_channels, vision.hidden_size,
                               kernel_size=vision.patch_size, stride=vision.patch_size,
                               dtype=self.config.params_dtype)

    def position_table(self) -> torch.nn.Module:
        """The ``pos_embed`` module: ``pos_embed(x [N, D], segments) -> x + positions``."""
        raise NotImplementedError

    def rope_angles(self, segments: Tensor) -> Tensor | None:
        """Per-patch rotary angles ``[N, head_dim/2]`` (CPU) of ``segments``; None: no RoPE."""
        raise NotImplementedError

    def segments(self, grid: Tensor) -> Tensor:
        """``grid_thw [M, 3]`` (CPU, long) -> the attention segments ``[S, 3]``, one row per unit
        of work (split mode shares them out, the merger merges each on its own): the items."""
        return grid

    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Pre-merge features ``[N, D]`` (after the final norm) for ``pixel_values [N, C, p, p]``
        in raster order (item, frame, row, col) and ``grid_thw [M, 3]``.

        With sequence parallelism the result is gathered to every TP rank, and its backward
        *splits* the gradient: consumers must run replicated over TP (the merger and the
        projectors do).
        """
        grid = grid_thw.detach().cpu().long()
        num_patches = pixel_values.shape[0]
        check_grid(grid, num_patches, self.max_frames)
        segments = self.segments(grid)
        self.num_encoded_items += segments.shape[0]
        if self.encoded_item_log is not None:
            sums = pixel_values.detach().double().split(segments.prod(dim=1).tolist())
            self.encoded_item_log.extend(
                (*map(int, g), float(x.sum())) for g, x in zip(segments.tolist(), sums))
        device = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(1)  # [N, D]
        x = self.pos_embed(x, segments).unsqueeze(1)  # [N, 1, D]: megatron's [s, b, h]
        angles = self.rope_angles(segments)
        # SP shards the sequence evenly over TP ranks: pad to a multiple of tp with one empty
        # document (real length 0) that attends nothing real; it is cut off again below.
        pad = (-num_patches) % self.config.tensor_model_parallel_size
        pad = pad if self.config.sequence_parallel else 0
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        angles = F.pad(angles, (0, 0, 0, pad)).to(device) if angles is not None else None
        params = packed_seq_params(segments.prod(dim=1), pad, device)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        x = self.encoder(
            hidden_states=x, attention_mask=None, rotary_pos_emb=angles, packed_seq_params=params
        )
        if self.config.sequence_parallel:
            # Merger and projector run replicated on every TP rank, so each rank's gradient of
            # the gathered tensor is already complete: backward splits, it does not reduce.
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return x[:num_patches, 0]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Merged features ``[sum over segments of h*w / (kh*kw), kh*kw, D]``: one row per LLM
        placeholder token (segment order), frames of a segment mean-pooled."""
        grid = grid_thw.detach().cpu().long()  # one host copy for every index built below
        if self.split_group is not None and self.split_group.size() > 1:
            return self._forward_split(pixel_values, grid)
        return self._merge(self.encode(pixel_values, grid), self.segments(grid))

    def _merge(self, x: Tensor, segments: Tensor) -> Tensor:
        """``[N, D]`` features of ``segments`` -> ``[tokens, kh*kw, D]`` (merger input)."""
        return tpool_patch_merger(x, segments, self.vision.merge_kernel_height,
                                  self.vision.merge_kernel_width)

    def _forward_split(self, pixel_values: Tensor, grid: Tensor) -> Tensor:
        """Split mode: encode this rank's share of the segments, gather all in segment order."""
        check_grid(grid, pixel_values.shape[0], self.max_frames)
        vis, group, segments = self.vision, self.split_group, self.segments(grid)
        owners = assign_items(item_costs(segments, vis.hidden_size, vis.ffn_hidden_size),
                              group.size())
        mine = [m for m, owner in enumerate(owners) if owner == group.rank()]
        if mine:
            bounds = F.pad(segments.prod(dim=1).cumsum(0), (1, 0)).tolist()
            index = torch.cat([torch.arange(bounds[m], bounds[m + 1]) for m in mine])
            x = self.encode(pixel_values.index_select(0, index.to(pixel_values.device)),
                            segments[mine])
            local = self._merge(x, segments[mine])
        else:
            local = pixel_values.new_zeros(0, vis.merge_size, vis.hidden_size,
                                           dtype=self.patch_embed.weight.dtype)
        rows = (segments[:, 1] * segments[:, 2] // vis.merge_size).tolist()
        return gather_items(local, self.patch_embed.weight, rows, owners, group,
                            self.split_reduce_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron's, with one main replica per TP group in split mode (``set_replica_ids``)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replica_group is not None:
            set_replica_ids(state, self.replica_group.rank())
        return state


@dataclass(frozen=True)
class TowerGroups:
    """How a tower is built under ``parallel`` (:func:`tower_groups`)."""

    parallel: ParallelConfig
    """The parallel config of the tower's megatron config (TP 1 when replicated)."""
    pg_collection: Any
    """The process groups it is built on."""
    split_group: Any
    """:attr:`PackedViT.split_group`."""
    split_reduce_group: Any
    """:attr:`PackedViT.split_reduce_group`."""
    replica_group: Any
    """:attr:`PackedViT.replica_group`."""

    def tower_kwargs(self) -> dict[str, Any]:
        """The :class:`PackedViT` constructor's group arguments."""
        return {"pg_collection": self.pg_collection, "split_group": self.split_group,
                "split_reduce_group": self.split_reduce_group,
                "replica_group": self.replica_group}


def tower_groups(parallel_mode: str, parallel: ParallelConfig, pg_collection=None) -> TowerGroups:
    """The groups of a tower in ``model.vision.parallel_mode`` on ``pg_collection`` (None:
    :func:`~megatron_vlm.parallel.runtime.groups_or_default`'s), see ``parallel/vision_split.py``.
    """
    groups = groups_or_default(pg_collection, required=True)
    tower_pgs, parallel_tower = groups, parallel
    split_group = replica_group = reduce_group = None
    if parallel_mode == "split" and parallel.tp > 1:
        if not parallel.sequence_parallel:
            raise ValueError(
                "model.vision.parallel_mode=split needs parallel.sequence_parallel=true: megatron "
                "sums the replicated tower's per-rank gradients over TP only then "
                "(finalize_model_grads); or set model.vision.parallel_mode=tp")
        # Replicated over TP: an unsharded tower on TP/CP groups of this rank alone.
        split_group = replica_group = groups.tp
        parallel_tower = ParallelConfig(tp=1, sequence_parallel=False)
        tower_pgs = replica_process_groups(groups)
    if parallel.cp > 1:
        # Context parallelism: items split over TP x CP (split mode) or CP (tp mode), never
        # encoded on two CP ranks; the gather's backward sums over CP (vision_split.py).
        reduce_group = groups.cp
        split_group = groups.tp_cp if parallel_mode == "split" else reduce_group
    return TowerGroups(parallel=parallel_tower, pg_collection=tower_pgs, split_group=split_group,
                       split_reduce_group=reduce_group, replica_group=replica_group)
