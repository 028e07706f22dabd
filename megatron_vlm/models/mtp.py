"""Multi-token prediction (MTP): megatron-core's MTP block on our GPT models.

megatron-core 0.16.1 builds the MTP layers from ``mtp_num_layers`` and an MTP block spec
(``models/specs.py::llm_mtp_block_spec``) and trains them inside ``GPTModel._postprocess``: the
MTP losses (labels rolled one token further per layer) are scaled by
``mtp_loss_scaling_factor`` (``LLMConfig.mtp_loss_weight``) and attached to the main hidden
states' gradient by ``MTPLossAutoScaler``, so the returned per-token LM loss is the main
model's alone.

Two gaps, closed by :class:`MtpLogitsMixin`:

* With MTP on, ``_postprocess`` calls ``labels.clone()`` unconditionally
  (``models/gpt/gpt_model.py:612``), so a forward without labels -- logits for evaluation,
  probes or a comparison with transformers -- fails. Without labels the MTP layers have nothing
  to predict: they are skipped and the main model's logits returned, exactly what megatron
  computes for them when labels are given.
* megatron's packed-sequence roll (``multi_token_prediction.py::_roll_tensor_packed_seq``: the
  MTP inputs, labels and loss mask shifted one token left within each document) indexes the
  packed tensor with ``cu_seqlens_q``. Ours are the real lengths' cumulative sums (TE's THD
  convention), the documents' places in the sequence are ``cu_seqlens_q_padded``: with padding
  the roll would cut documents at the wrong tokens (and under CP it divides those boundaries by
  ``cp``, assuming spans padded to ``2 cp``). The MTP part is therefore given the padded
  boundaries as its documents: rolls then stay inside each padded span, and a real token's last
  neighbour is its document's padding (its label masked); real tokens' attention is unchanged
  (causal: padding comes after them in their span).
* The MTP layers embed the (rolled) ``input_ids`` themselves, on this rank's tokens. A VLM hands
  its LLM the whole sequence's ids (it splits the merged embeddings over CP itself,
  ``models/vlm.py``), so under context parallelism the ids and position ids are cut to this CP
  rank's tokens (``parallel/context.py``'s split, as megatron's CP roll expects) for the MTP part.
  The MTP input at a media placeholder is the placeholder token's embedding (the merged vision
  features are the decoder's input only); the loss mask keeps predicting placeholders out of the
  loss, as for the main head.
* Likewise a VLM builds its LLM with ``scatter_embedding_sequence_parallel=False`` (it scatters
  the merged embeddings over sequence parallelism itself), while the MTP layers embed with that
  same ``embedding`` module: for the MTP part its output is scattered to this rank's sequence
  slice, as the hidden states it is joined with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vlm.models.attention import cp_layout_for
from megatron_vlm.models.mrope import MRopeGPTModel


def padded_documents(params: PackedSeqParams | None) -> PackedSeqParams | None:
    """THD ``params`` whose documents are the padded spans (``cu_seqlens_*_padded``); others
    unchanged (see the module docstring)."""
    if params is None or params.qkv_format != "thd" or params.cu_seqlens_q_padded is None:
        return params
    return dataclasses.replace(params, cu_seqlens_q=params.cu_seqlens_q_padded,
                               cu_seqlens_kv=params.cu_seqlens_kv_padded)


class MtpLogitsMixin:
    """``_postprocess`` without labels: the main model's logits ``[b, s, vocab]``, MTP skipped;
    with labels, megatron's own (LM loss, MTP losses on the gradient) with the padded document
    boundaries for the MTP part (module docstring)."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        if labels is not None or not self.config.mtp_num_layers:
            if self.config.mtp_num_layers:
                params = kwargs.get("packed_seq_params")
                # a VLM's placeholder ids may lie outside the table (models/vlm.py embed)
                input_ids = input_ids.masked_fill(input_ids >= self.vocab_size, 0)
                input_ids = self._cp_local(input_ids, params)
                position_ids = self._cp_local(position_ids, params)
                kwargs["packed_seq_params"] = padded_documents(params)
            with self._mtp_embedding_scattered():
                return super()._postprocess(hidden_states=hidden_states, input_ids=input_ids,
                                            position_ids=position_ids, labels=labels, **kwargs)
        if kwargs.get("inference_context") is not None:
            raise NotImplementedError("inference (KV cache) with MTP layers is not implemented")
        if not self.post_process:
            return hidden_states
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else None)
        logits, _ = self.output_layer(hidden_states, weight=weight,
                                      runtime_gather_output=kwargs.get("runtime_gather_output"))
        return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v], as megatron

    @contextlib.contextmanager
    def _mtp_embedding_scattered(self) -> Iterator[None]:
        """While the MTP layers run: the embedding scatters its output over sequence parallelism
        (module docstring; only the MTP layers embed inside ``_postprocess``)."""
        embedding = getattr(self, "embedding", None)
        if (embedding is None or not self.config.mtp_num_layers
                or not self.config.sequence_parallel or embedding.scatter_to_sequence_parallel):
            yield
            return
        embedding.scatter_to_sequence_parallel = True
        try:
            yield
        finally:
            embedding.scatter_to_sequence_parallel = False

    def _cp_local(self, x, params: PackedSeqParams | None):
        """Whole-sequence ids ``[..., S]`` -> this CP rank's ``[..., S / cp]`` (ids already
        local, e.g. a text-only model's from ``training/step.py``, pass unchanged)."""
        cp = self.config.context_parallel_size
        if cp == 1 or x is None or params is None or params.qkv_format != "thd":
            return x
        total = int(params.cu_seqlens_q_padded[-1])
        if x.shape[-1] != total:
            return x
        layout = cp_layout_for(params, total, cp, self.pg_collection.cp.rank(), x.device)
        return x.index_select(x.dim() - 1, layout.local_index.to(x.device))


class MtpGPTModel(MtpLogitsMixin, GPTModel):
    """megatron's ``GPTModel`` with MTP layers (1D RoPE or MLA)."""


class MtpMRopeGPTModel(MtpLogitsMixin, MRopeGPTModel):
    """:class:`~megatron_vlm.models.mrope.MRopeGPTModel` with MTP layers (GLM-4.5-Air)."""
