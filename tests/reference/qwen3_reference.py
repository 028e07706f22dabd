"""Tiny Qwen3 references for ``test_qwen3_llm.py`` and ``test_mrope.py``: transformers'
``Qwen3ForCausalLM`` (random, every weight perturbed so a wrong mapping shows), our GQA LLM from
the same sizes, and the HF -> megatron weight mapping written out here (independent of the
conversion tables; the family's HF table will replace it).

Sizes: hidden 48, 2 layers, 4 query heads / 2 key-value heads of head dim 16 (so the q
projection, 64 wide, is not hidden-square and ``kv_channels`` must be set), SwiGLU 96, q/k
RMSNorm, no biases, untied head, RMSNorm eps 1e-6, vocab 128.
"""

from __future__ import annotations

import torch

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 128, 48, 2, 4, 2, 16, 96
EPS = 1e-6


def hf_qwen3(theta: float, seed: int = 0):
    """A tiny fp32 ``Qwen3ForCausalLM`` (eager attention), weights perturbed away from init."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        rms_norm_eps=EPS, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                      "rope_theta": theta})
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            else:  # std 0.2: sharp attention, so position errors reach the logits
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def our_llm_config(theta: float, **overrides):
    """Our ``LLMConfig`` for the sizes of :func:`hf_qwen3` (a dense GQA LLM)."""
    from megatron_vlm.config.model import LLMConfig

    kwargs = dict(
        attention="gqa", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
        num_attention_heads=HEADS, num_query_groups=KV_HEADS, kv_channels=HEAD_DIM,
        qk_layernorm=True, add_qkv_bias=False, ffn_hidden_size=FFN, num_experts=None,
        num_dense_layers=LAYERS, rope_theta=theta, norm_epsilon=EPS, untie_embeddings=True,
        max_position_embeddings=256)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def megatron_state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Qwen3 names -> megatron's local GQA ``GPTModel`` names (TP = 1).

    ``linear_qkv`` rows are interleaved per query group: for group ``g``, its ``HEADS /
    KV_HEADS`` query heads, then key head ``g``, then value head ``g``; ``linear_fc1`` is
    ``[gate; up]`` (megatron's SwiGLU takes the first half through SiLU).
    """
    out = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"],
           "output_layer.weight": hf_state["lm_head.weight"]}
    rep = HEADS // KV_HEADS
    for i in range(LAYERS):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf_state[hf + "self_attn.q_proj.weight"].view(KV_HEADS, rep * HEAD_DIM, HIDDEN)
        k = hf_state[hf + "self_attn.k_proj.weight"].view(KV_HEADS, HEAD_DIM, HIDDEN)
        v = hf_state[hf + "self_attn.v_proj.weight"].view(KV_HEADS, HEAD_DIM, HIDDEN)
        out[ours + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(
            -1, HIDDEN)
        out[ours + "self_attention.linear_proj.weight"] = hf_state[hf + "self_attn.o_proj.weight"]
        out[ours + "self_attention.q_layernorm.weight"] = hf_state[hf + "self_attn.q_norm.weight"]
        out[ours + "self_attention.k_layernorm.weight"] = hf_state[hf + "self_attn.k_norm.weight"]
        out[ours + "input_layernorm.weight"] = hf_state[hf + "input_layernorm.weight"]
        out[ours + "pre_mlp_layernorm.weight"] = hf_state[hf + "post_attention_layernorm.weight"]
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]])
        out[ours + "mlp.linear_fc2.weight"] = hf_state[hf + "mlp.down_proj.weight"]
    return out


def build_ours(llm, hf_model, kernels=None):
    """Our LLM (eval; ``kernels``: ``model.kernels``, default auto = local ``sdpa_mask`` on
    CPU) from ``llm`` with ``hf_model``'s weights; every parameter is loaded (strict), none
    left at its init."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(llm, ParallelConfig(), kernels=kernels).eval()
    state = megatron_state_from_hf(hf_model.state_dict())
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(state), sorted(set(params) ^ set(state))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model


def packed_params(lengths: list[int], spans: list[int]):
    """THD parameters of documents of real ``lengths`` in padded ``spans`` (the project's
    ``thd_packed_seq_params``, as training builds them)."""
    from megatron_vlm.models.attention import thd_packed_seq_params

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(spans).cumsum(0).tolist()], dtype=torch.int32)
    return thd_packed_seq_params(cu, cu_pad, sum(spans), torch.device("cpu"))
