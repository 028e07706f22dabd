"""The VLM: vision tower -> projector -> scatter into the text embeddings -> the LLM.

The tower and projector are the model family's (``families/``; Kimi's are built here:
``kimi_vision_tower``, ``kimi_projector``). One micro-batch is a packed sequence (SPEC §11).
Media items (images, video chunks) are encoded together by the tower (block-diagonal attention
per item; Kimi: MoonViT, merged 2x2 with temporal mean pooling), projected to the LLM width and
written into their placeholder positions of the word embeddings *before* the sequence is split
-- context parallelism (each CP rank keeps its two load-balanced chunks of every document,
``parallel/context.py``), then sequence parallelism -- so the split sees the merged sequence and
a vision token never straddles ranks incorrectly. Pipeline stages after the first hold only LLM
layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.models.attention import cp_layout_for
from megatron_vlm.models.llm import build_llm, llm_head_dims, scatter_padding_mask
from megatron_vlm.models.projector import build_projector
from megatron_vlm.models.specs import KernelChoice, resolve_kernels
from megatron_vlm.models.vision.moonvit import build_moonvit
from megatron_vlm.parallel.runtime import groups_or_default


def kernel_choice(model: ModelConfig, parallel: ParallelConfig) -> KernelChoice:
    """The layer implementations and kernel fusions a model is built with on this machine: one
    choice for the LLM and, in a VLM, the tower (what ``KimiVLM`` and ``build_llm`` resolve)."""
    dropout, heads = model.llm.attention_dropout, llm_head_dims(model.llm)
    if model.is_vlm:  # a tower without attention (no head_dim) adds no constraint
        dropout = max(dropout, getattr(model.vision, "attention_dropout", 0.0))
        head_dim = getattr(model.vision, "head_dim", None)
        heads = heads if head_dim is None else (*heads, head_dim)
    return resolve_kernels(model.kernels, params_dtype=model.params_dtype,
                           attention_dropout=dropout, head_dims=heads,
                           context_parallel=parallel.cp > 1, llm=model.llm)


class VisionLanguageModel(MegatronModule):
    """A family's vision tower + projector + megatron ``GPTModel``, one pipeline stage of it.

    The tower and projector come from the model family (``families/``: ``build_vision_tower``,
    ``build_projector``, ``llm_tokens_per_item``); the LLM is ``build_llm(model.llm)`` for every
    family. Built on ``pg_collection`` (training: the runtime's; None: :func:`~megatron_vlm.
    parallel.runtime.groups_or_default`'s) with ``choice`` (None: :func:`kernel_choice`).
    """

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, *,
                 build_vision_tower: Callable[..., torch.nn.Module],
                 build_projector: Callable[..., torch.nn.Module],
                 llm_tokens_per_item: Callable[..., torch.Tensor],
                 pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, pg_collection=None,
                 choice: KernelChoice | None = None) -> None:
        pg_collection = groups_or_default(pg_collection, required=True)
        # One implementation choice (backend, attention kernel) for the LLM and the tower.
        if choice is None:
            choice = kernel_choice(model, parallel)
        llm = model.llm
        if model.freeze_llm:
            # The router's expert bias is a buffer that megatron's finalize_model_grads moves by
            # sign(load offset) * rate every step (finalize_model_grads.py:477); a frozen LLM
            # must not change, so its routing is frozen too.
            llm = dataclasses.replace(llm, moe_router_bias_update_rate=0.0)
        language_model: GPTModel = build_llm(
            llm, parallel, model.params_dtype, pre_process=pre_process,
            post_process=post_process, vp_stage=vp_stage, choice=choice,
            pg_collection=pg_collection,
            # We scatter to the sequence-parallel layout ourselves, after vision tokens are in.
            scatter_embedding_sequence_parallel=False,
        )
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.pre_process, self.post_process = pre_process, post_process
        self.family = model.family
        self._vision_config = model.vision
        self._llm_tokens_per_item = llm_tokens_per_item
        # Attributes megatron's schedules and grad finalisation look up on the outer model.
        self.model_type = language_model.model_type
        self.share_embeddings_and_output_weights = (
            language_model.share_embeddings_and_output_weights)
        self.vision_tower = self.projector = None
        if pre_process:
            self.vision_tower = build_vision_tower(model, parallel, pg_collection=pg_collection,
                                                   choice=choice)
            self.projector = build_projector(model, parallel, pg_collection=pg_collection)
        freeze = {"vision_tower": model.freeze_vision, "projector": model.freeze_projector,
                  "language_model": model.freeze_llm}
        for name, frozen in freeze.items():
            module = getattr(self, name)
            if frozen and module is not None:
                for param in module.parameters():
                    param.requires_grad_(False)

    def llm_tokens_per_item(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[M]`` placeholder tokens of each media item, by the family's rule."""
        return self._llm_tokens_per_item(self._vision_config, grid_thw)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: activations from the previous stage go to the LLM decoder."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """Grad-finalisation hook: with MTP layers (or tied embeddings) megatron all-reduces the
        word embedding's gradient between the first and the last pipeline stage, asking the
        outer model for it (``finalize_model_grads.py:147``)."""
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
              media_positions: torch.Tensor | None = None,
              packed_seq_params=None) -> torch.Tensor:
        """Word embeddings ``[s, b, h]`` with projected media features at their placeholders,
        then this rank's context-parallel chunks (``[s / cp, b, h]``) and SP shard.

        Args:
            input_ids: ``[1, S]`` token ids (placeholders included).
            position_ids: ``[1, S]``.
            pixel_values: ``[N, 3, 14, 14]`` patches of every media item, or None.
            grid_thw: ``[M, 3]`` per item (t, h, w) in patches.
            media_positions: ``[sum(h*w/4)]`` sequence index of every placeholder, item order.
            packed_seq_params: the micro-batch's global THD parameters (needed under context
                parallelism: the split follows their padded document boundaries).
        """
        lm = self.language_model
        # Placeholder ids may lie outside the table (HF's video placeholder is id == vocab size).
        ids = input_ids.masked_fill(input_ids >= lm.vocab_size, 0)
        emb = lm.embedding(input_ids=ids, position_ids=position_ids)  # [s, b, h]
        if pixel_values is not None and grid_thw is not None and grid_thw.numel():
            if emb.shape[1] != 1:
                raise ValueError("media need packed micro-batches of one sequence (b = 1)")
            dtype = next(self.vision_tower.parameters()).dtype
            features = self.projector(self.vision_tower(
                pixel_values.to(device=emb.device, dtype=dtype), grid_thw))
            positions = media_positions.to(emb.device)
            if features.shape[0] != positions.numel():
                expected = self.llm_tokens_per_item(grid_thw).tolist()
                raise ValueError(
                    f"media features ({features.shape[0]}) and placeholder tokens "
                    f"({positions.numel()}) do not match: family {self.family!r} makes "
                    f"{expected} tokens of these items")
            if positions.numel() and int(positions.max()) >= emb.shape[0]:
                raise ValueError("a placeholder span runs past the end of the packed sequence")
            zeros = torch.zeros_like(positions)
            emb = emb.index_put((positions, zeros), features.to(emb.dtype))
        cp = self.config.context_parallel_size
        if cp > 1:
            # Every CP rank embeds the whole sequence (cheap next to attention; the vision
            # features come from one rank per item, parallel/vision_split.py) and keeps its
            # chunks; the embedding gradient is partial per CP rank and megatron's DDP sums it
            # over DP x CP. The backward of the item gather sums the features' gradients.
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                raise ValueError("context parallelism needs packed THD micro-batches "
                                 "(packed_seq_params with qkv_format='thd')")
            layout = cp_layout_for(packed_seq_params, emb.shape[0], cp,
                                   self.language_model.pg_collection.cp.rank(), emb.device)
            emb = emb.index_select(0, layout.local_index)
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(
                emb, group=self.language_model.pg_collection.tp)
        return emb

    def forward(self, input_ids, position_ids, attention_mask, labels=None,
                packed_seq_params=None, padding_mask=None, pixel_values=None, grid_thw=None,
                media_positions=None, **kwargs):
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, pixel_values, grid_thw,
                                       media_positions, packed_seq_params)
        if padding_mask is not None and self.config.sequence_parallel:
            # megatron scatters the mask only when it embeds the tokens itself (gpt_model.py:314).
            padding_mask = scatter_padding_mask(padding_mask,
                                                self.language_model.pg_collection.tp)
        return self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            packed_seq_params=packed_seq_params, padding_mask=padding_mask, **kwargs)


def kimi_vision_tower(model: ModelConfig, parallel: ParallelConfig, *, pg_collection,
                      choice: KernelChoice | None = None) -> torch.nn.Module:
    """The Kimi family's tower: MoonViT (-3D) with its 2x2 temporal-pooling merge."""
    return build_moonvit(model.vision, parallel, model.params_dtype,
                         pg_collection=pg_collection, choice=choice)


def kimi_projector(model: ModelConfig, parallel: ParallelConfig, *,
                   pg_collection) -> torch.nn.Module:
    """The Kimi family's projector: LayerNorm per sub-token -> Linear -> GELU -> Linear."""
    return build_projector(model.projector, parallel, model.params_dtype,
                           tp_group=pg_collection.tp)


def kimi_llm_tokens_per_item(vision: VisionConfig, grid_thw: torch.Tensor) -> torch.Tensor:
    """``h*w / merge`` per item: the frames of a chunk are mean-pooled into one (MoonViT-3D)."""
    return grid_thw[:, 1] * grid_thw[:, 2] // vision.merge_size


class KimiVLM(VisionLanguageModel):
    """MoonViT + Kimi projector + megatron ``GPTModel`` (MLA/MoE): the Kimi family's VLM
    (``families/kimi`` names these parts)."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, **stage) -> None:
        super().__init__(model, parallel, build_vision_tower=kimi_vision_tower,
                         build_projector=kimi_projector,
                         llm_tokens_per_item=kimi_llm_tokens_per_item, **stage)
