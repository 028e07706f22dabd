"""Real-size LLM recipes (SPEC §2). H100 layouts and VLM parts join in later issues."""

from __future__ import annotations

from megatron_vlm.config import (
    DataConfig, JobConfig, LLMConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig,
    YarnConfig,
)


def kimi_k25_llm() -> LLMConfig:
    """Kimi K2 / K2.5 LLM: 61 layers, MLA (q_lora 1536), 384 experts top-8 + 1 shared."""
    return LLMConfig(
        vocab_size=163840, hidden_size=7168, num_layers=61, num_attention_heads=64,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, ffn_hidden_size=18432, num_dense_layers=1, num_experts=384,
        moe_router_topk=8, num_shared_experts=1, moe_ffn_hidden_size=2048,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.827,
        rope_theta=50000.0,
        yarn=YarnConfig(factor=64.0, original_max_position_embeddings=4096, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=262144,
    )


def moonlight_llm() -> LLMConfig:
    """Moonlight-16B-A3B (the Kimi-VL LLM): 27 layers, q_proj, 64 experts top-6 + 2 shared."""
    return LLMConfig(
        vocab_size=163840, hidden_size=2048, num_layers=27, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, ffn_hidden_size=11264, num_dense_layers=1, num_experts=64,
        moe_router_topk=6, num_shared_experts=2, moe_ffn_hidden_size=1408,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.446,
        rope_theta=800000.0, max_position_embeddings=131072,
    )


def kimi_k25() -> JobConfig:
    """Kimi K2.5 LLM at full size (parameters ~1.03T, ~32B activated)."""
    return JobConfig(
        name="kimi_k25",
        model=ModelConfig(llm=kimi_k25_llm(), params_dtype="bf16"),
        # A starting layout only; the cluster issue's planner chooses real H100 layouts
        # (61 layers need an uneven pipeline split, which is not configured here yet).
        parallel=ParallelConfig(tp=8, pp=1, ep=64, etp=1, sequence_parallel=True,
                                use_distributed_optimizer=True),
        data=DataConfig(seq_length=4096, global_batch_size=4096, tokenizer_vocab_size=163840),
        optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=500, schedule="wsd"),
        # 16.8M tokens per step (4096 x 4096): ~15T tokens is ~900k steps.
        train=TrainConfig(steps=900_000, eval_interval=1000, log_interval=10,
                          output_dir="runs/kimi_k25"),
    )


def kimi_vl_a3b() -> JobConfig:
    """Kimi-VL-A3B's LLM (Moonlight-16B-A3B) at full size (~16B total, ~3B activated)."""
    return JobConfig(
        name="kimi_vl_a3b",
        model=ModelConfig(llm=moonlight_llm(), params_dtype="bf16"),
        parallel=ParallelConfig(tp=1, pp=1, ep=8, use_distributed_optimizer=True),
        data=DataConfig(seq_length=8192, global_batch_size=1024, tokenizer_vocab_size=163840),
        optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=500, schedule="wsd"),
        # 8.4M tokens per step (1024 x 8192): ~4.4T tokens is ~520k steps.
        train=TrainConfig(steps=520_000, eval_interval=1000, log_interval=10,
                          output_dir="runs/kimi_vl_a3b"),
    )
