"""The tiny CPU recipe: the README's main job, minutes on 2 cores."""

from __future__ import annotations

import dataclasses

from megatron_vlm.config import (
    CheckpointConfig, DataConfig, JobConfig, LLMConfig, ModelConfig, MultimodalDataConfig,
    OptimConfig, ParallelConfig, ProjectorConfig, TrainConfig, VisionConfig,
)


def tiny_llm(vocab_size: int = 1024) -> LLMConfig:
    """A K2-shaped LLM scaled down: MLA with q_lora, 1 dense + 2 MoE layers, sigmoid router with
    expert bias, 8 experts top-2 + 1 shared. The bias update rate is 10x K2's so balancing is
    visible within a 150-step run."""
    return LLMConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=3, num_attention_heads=4,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        ffn_hidden_size=192, num_dense_layers=1, num_experts=8, moe_router_topk=2,
        num_shared_experts=1, moe_ffn_hidden_size=48, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=2.5, moe_router_bias_update_rate=1e-2,
        moe_token_dispatcher="alltoall", rope_theta=10000.0, max_position_embeddings=1024,
    )


def tiny_cpu() -> JobConfig:
    """Tiny MLA/MoE pretraining on the bundled corpus (CPU, fp32, one process)."""
    return JobConfig(
        name="tiny_cpu",
        model=ModelConfig(llm=tiny_llm(), params_dtype="fp32"),
        parallel=ParallelConfig(),
        data=DataConfig(seq_length=256, global_batch_size=8, tokenizer_vocab_size=1024),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, schedule="cosine"),
        train=TrainConfig(steps=150, eval_interval=50, eval_batches=4, log_interval=10,
                          output_dir="runs/tiny_cpu", peak_tflops=0.1),
        checkpoint=CheckpointConfig(save_interval=50),
    )


def tiny_moonvit() -> VisionConfig:
    """MoonViT shape scaled down: 2 layers, width 32, 4 heads, 16x16 position table."""
    return VisionConfig(
        hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64, patch_size=14,
        pos_emb_height=16, pos_emb_width=16, temporal_patch_size=4, merge_kernel_height=2,
        merge_kernel_width=2,
    )


def tiny_vlm_cpu() -> JobConfig:
    """A K2.5-style VLM pretraining on the bundled multimodal corpus: the tiny MLA/MoE LLM with a
    tiny MoonViT-3D and the Kimi projector; joint mix of images, QA, video, interleaved, text."""
    job = tiny_cpu()
    # 1024 SentencePiece ids + the media special tokens, padded to a multiple of 128.
    llm = dataclasses.replace(job.model.llm, vocab_size=1152)
    model = ModelConfig(
        llm=llm, vision=tiny_moonvit(),
        projector=ProjectorConfig(vision_hidden_size=32, merge_size=4,
                                  output_size=llm.hidden_size),
        params_dtype="fp32",
    )
    data = dataclasses.replace(
        job.data, seq_length=512,
        multimodal=MultimodalDataConfig(stage="joint", num_workers=1,
                                        max_patches_per_micro_batch=2048,
                                        image_max_patches=256, video_chunk_max_patches=64))
    train = dataclasses.replace(job.train, output_dir="runs/tiny_vlm_cpu")
    return dataclasses.replace(job, name="tiny_vlm_cpu", model=model, data=data, train=train)
