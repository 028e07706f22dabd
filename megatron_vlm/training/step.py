"""``forward_step`` for megatron-core's pipeline schedules: PackedBatch -> model -> loss.

The loss is a global per-token mean (SPEC §11): each micro-batch returns its *sum* of token
losses and its token count; megatron's ``finalize_model_grads`` divides gradients by the token
count all-reduced over micro-batches and DP x CP ranks (``calculate_per_token_loss=True``).

Context parallelism: each CP rank keeps its two load-balanced chunks of every document
(``parallel/context.py``) of the labels, loss mask, position ids and padding mask here, so its
loss sum and token count cover its own tokens; the count and the gradients are summed over
DP x CP by megatron (``finalize_model_grads``, DDP's ``dp_cp`` group), the reported loss over
DP x CP by the trainer. The VLM gets the whole token sequence and splits the *merged* embeddings
itself (vision features scattered in first); a text-only ``GPTModel`` gets its tokens split.
``PackedSeqParams`` stay global (megatron's THD convention).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.models.attention import cp_layout_for, thd_packed_seq_params
from megatron_vlm.models.llm import scatter_padding_mask
from megatron_vlm.models.vlm import VisionLanguageModel
from megatron_vlm.training.model_setup import unwrap


def packed_seq_params(batch: PackedBatch, device: torch.device) -> PackedSeqParams:
    """THD parameters of one packed micro-batch (tail padding as an empty document)."""
    return thd_packed_seq_params(batch.cu_seqlens, batch.cu_seqlens_padded, batch.seq_length,
                                 device)


def media_positions(vision: VisionInputs, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence index of every placeholder token, item by item.

    ``counts``: placeholder tokens per item by the model family's rule (``VisionLanguageModel.
    llm_tokens_per_item``: Kimi ``h*w/4``, Keye ``t*h*w/4``); None: Kimi's rule.
    """
    counts = vision.num_llm_tokens if counts is None else counts
    counts, starts = counts.tolist(), vision.placeholder_starts.tolist()
    if not counts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])


def context_parallel_index(model, params: PackedSeqParams, seq_length: int,
                           device: torch.device) -> torch.Tensor | None:
    """Global token indices this CP rank holds (``parallel/context.py``); None without CP."""
    inner = unwrap(model)
    cp = inner.config.context_parallel_size
    if cp == 1:
        return None
    lm = inner.language_model if isinstance(inner, VisionLanguageModel) else inner
    return cp_layout_for(params, seq_length, cp, lm.pg_collection.cp.rank(), device).local_index


def model_inputs(batch: PackedBatch, device: torch.device, model) -> dict:
    """Keyword arguments of the model's forward for one packed micro-batch (this CP rank's
    share of the per-token tensors under context parallelism, see the module docstring)."""
    inner = unwrap(model)
    params = packed_seq_params(batch, device)
    cp_index = context_parallel_index(model, params, batch.seq_length, device)

    def local(x: torch.Tensor) -> torch.Tensor:  # [1, S] -> this CP rank's [1, S / cp]
        x = x.to(device)
        return x if cp_index is None else x.index_select(1, cp_index)

    padding_mask = local(batch.padding_mask)
    if (isinstance(inner, GPTModel) and inner.config.sequence_parallel
            and not inner.pre_process):
        # Later pipeline stages: megatron leaves the mask unscattered (gpt_model.py:314).
        padding_mask = scatter_padding_mask(padding_mask)
    vlm = isinstance(inner, VisionLanguageModel)
    # A family with M-RoPE (Keye) carries [3, S] ids; they split along S with their tokens.
    positions = (batch.position_ids if batch.mrope_position_ids is None
                 else batch.mrope_position_ids)
    inputs = {
        # The VLM splits the merged embeddings itself, after the vision scatter.
        "input_ids": batch.tokens.to(device) if vlm else local(batch.tokens),
        "position_ids": positions.to(device) if vlm else local(positions),
        "attention_mask": None,
        "labels": local(batch.labels),
        # read only by megatron's MTP layers (their losses skip masked and padded positions)
        "loss_mask": local(batch.loss_mask),
        "packed_seq_params": params,
        "padding_mask": padding_mask,
    }
    if batch.vision is not None:
        if not vlm:
            raise ValueError("a batch with media reached a text-only model; set model.vision")
        grid = batch.vision.grid_thw
        inputs.update(pixel_values=batch.vision.pixel_values, grid_thw=grid,
                      media_positions=media_positions(batch.vision,
                                                      inner.llm_tokens_per_item(grid)))
    return inputs


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses and the token count (megatron's per-token-loss protocol)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[PackedBatch], model):
    """One micro-batch forward; returns the output and the loss function to apply to it."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device, model)
    output = model(**inputs)
    loss_mask = batch.loss_mask.to(device)
    cp_index = context_parallel_index(model, inputs["packed_seq_params"], batch.seq_length,
                                      device)
    if cp_index is not None:
        loss_mask = loss_mask.index_select(1, cp_index)
    return output, partial(loss_func, loss_mask)
