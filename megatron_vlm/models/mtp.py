"""Multi-token prediction (MTP): megatron-core's MTP block on our GPT models.

megatron-core 0.16.1 builds the MTP layers from ``mtp_num_layers`` and an MTP block spec
(``models/specs.py::llm_mtp_block_spec``) and trains them inside ``GPTModel._postprocess``: the
MTP losses (labels rolled one token further per layer) are scaled by
``mtp_loss_scaling_factor`` (``LLMConfig.mtp_loss_weight``) and attached to the main hidden
states' gradient by ``MTPLossAutoScaler``, so the returned per-token LM loss is the main
model's alone.

One gap: with MTP on, ``_postprocess`` calls ``labels.clone()`` unconditionally
(``models/gpt/gpt_model.py:612``), so a forward without labels -- logits for evaluation, probes
or a comparison with transformers -- fails. Without labels the MTP layers have nothing to
predict; :class:`MtpLogitsMixin` skips them and returns the main model's logits, exactly what
megatron computes for them when labels are given.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_vlm.models.mrope import MRopeGPTModel


class MtpLogitsMixin:
    """``_postprocess`` without labels: the main model's logits ``[b, s, vocab]``, MTP skipped
    (module docstring); with labels, megatron's own (LM loss, MTP losses on the gradient)."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        if labels is not None or not self.config.mtp_num_layers:
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


class MtpGPTModel(MtpLogitsMixin, GPTModel):
    """megatron's ``GPTModel`` with MTP layers (1D RoPE or MLA)."""


class MtpMRopeGPTModel(MtpLogitsMixin, MRopeGPTModel):
    """:class:`~megatron_vlm.models.mrope.MRopeGPTModel` with MTP layers (GLM-4.5-Air)."""
