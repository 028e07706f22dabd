"""Real-size recipes: Kimi-VL-A3B (MoonViT + Moonlight-16B-A3B) and Kimi K2.5 (MoonViT-3D + the
Kimi K2 1T-A32B LLM) with H100 layouts.

Each layout was chosen with ``tools/plan_parallel.py`` (``megatron_vlm/planning``) and is
re-checked by ``tests/planning/test_recipes.py``: it must build, divide its GPU count, and fit in
80 GB at the full ViT patch budget. The reasoning is in each docstring and in
``docs/recipes.md``; ``H100_GPUS`` says how many GPUs each is laid out for. Common to all:

* **MuonClip** (Muon on whole matrices, layer-wise sharded over DP; QK-Clip tau 100), bf16 params
  with fp32 masters; K2.5 steps take the global batch of Kimi K2 (~67M tokens).
* **TP inside a node** with sequence parallelism; **experts over EP with etp=1** (each expert
  whole on one GPU: no expert-TP all-gathers; EP x ETP = 8 keeps the all-to-all on NVLink).
* **The ViT on pipeline stage 0** in split mode (replicated over TP, each image/video chunk
  encoded on one rank); the pipeline split gives stage 0 fewer LLM layers so that its ViT +
  projector work (at half the patch budget, the mix's average) balances the other stages.
* Patch budgets for pretraining: 2 ViT patches per LLM token per micro-batch at 4K (an all-image
  pack would need 4), items of at most 4096 patches (~900 x 900 px; 1024 per video frame, 4096
  per 4-frame chunk) -- HF's inference limits (16384 / 4096 per frame) are for evaluation.
"""

from __future__ import annotations

import dataclasses

from megatron_vlm.config import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LLMConfig,
    ModelConfig,
    MultimodalDataConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    YarnConfig,
)
from megatron_vlm.config.vision import kimi_projector_config, moonvit_config

#: recipe name -> number of H100 80 GB GPUs its parallel layout is for.
H100_GPUS: dict[str, int] = {
    "kimi_vl_a3b": 64,
    "kimi_k25": 1024,
    "kimi_k25_512": 512,
    "kimi_k25_32k": 1024,
    "kimi_k25_128k": 1024,
}

#: megatron selective recompute for MLA + MoE: the MLA up-projections (Q, K, V), the expert
#: SwiGLU and the norms are rebuilt in backward; what remains is ~1/3 of the activations.
SELECTIVE = ["mla_up_proj", "moe_act", "layernorm"]


def kimi_k25_llm() -> LLMConfig:
    """Kimi K2 / K2.5 LLM as released: 61 layers, MLA (q_lora 1536), 384 experts top-8 + 1
    shared, YaRN x64 from 4096 (262144 positions)."""
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


def _vlm(llm: LLMConfig) -> ModelConfig:
    """MoonViT(-3D) + the Kimi projector + ``llm``, bf16, QK-Clip recorded in the LLM."""
    return ModelConfig(llm=dataclasses.replace(llm, qk_clip=True), vision=moonvit_config(),
                       projector=kimi_projector_config(llm.hidden_size), params_dtype="bf16")


def _muon(lr: float, warmup: int) -> OptimConfig:
    return OptimConfig(optimizer="muon", lr=lr, min_lr=lr / 10, weight_decay=0.1,
                       warmup_steps=warmup, schedule="wsd", qk_clip_tau=100.0)


def _k25(*, seq: int, yarn_factor: float, recompute: str, parallel: ParallelConfig,
         global_batch: int, patches: int, stage: str, steps: int, name: str) -> JobConfig:
    llm = kimi_k25_llm()
    yarn = dataclasses.replace(llm.yarn, factor=yarn_factor)
    llm = dataclasses.replace(llm, yarn=yarn, recompute=recompute, recompute_modules=SELECTIVE)
    align = 2 * parallel.cp * parallel.tp if parallel.cp > 1 else 1
    return JobConfig(
        name=name,
        model=_vlm(llm),
        parallel=parallel,
        data=DataConfig(
            seq_length=seq, global_batch_size=global_batch, require_inputs=True,
            pad_to_multiple=align,
            multimodal=MultimodalDataConfig(
                stage=stage, max_patches_per_micro_batch=patches, image_max_patches=4096,
                video_chunk_max_patches=1024, num_workers=4)),
        optim=_muon(lr=2e-4, warmup=500),
        train=TrainConfig(steps=steps, eval_interval=1000, log_interval=10,
                          output_dir=f"runs/{name}"),
        checkpoint=CheckpointConfig(save_interval=500, async_save=True),
    )


def kimi_k25() -> JobConfig:
    """K2.5 joint pretraining at 4K on 1,024 H100: tp8 pp16 ep8 etp1 (dp8), early fusion.

    Why: 1.03T parameters need model parallelism >= ~64 GPUs per replica for weights + fp32
    gradients (~6 bytes per parameter on the GPU that holds it). ep8 x pp16 puts 48 experts of 4
    layers on each GPU (16 GiB bf16 + 32 GiB fp32 gradients); EP inside a node keeps the
    all-to-all on NVLink, PP (not more EP) carries the rest because pipeline sends are cheap
    across nodes. TP=8 inside the node splits attention and the dense/shared MLPs and shards the
    sequence (SP) so activations stay small; Muon's layer-wise state over dp=8 adds ~8 GiB.
    Selective recompute (MLA up-projections, expert SwiGLU, norms) keeps 16 in-flight
    micro-batches of stage 0 within budget. Stage 0 holds the ViT and 3 LLM layers, the last
    stage 2 layers and the head (the planner's balance at half the patch budget). Planned: 64.7
    GiB on the busiest rank (params 16, fp32 grads 32, Muon 8, activations 9), 0.7% bubble,
    36% MFU at the full patch budget and 43% at half (55% math efficiency assumed). 67M tokens
    per step (16,384 x 4,096); 10% vision tokens from step 0 (K2.5's early fusion).
    """
    return _k25(seq=4096, yarn_factor=1.0, recompute="selective", name="kimi_k25",
                parallel=ParallelConfig(tp=8, pp=16, cp=1, ep=8, etp=1, sequence_parallel=True,
                                        use_distributed_optimizer=True,
                                        pipeline_layout="E,t*3|(t*4|)*14,ttL"),
                global_batch=16384, patches=8192, stage="early_fusion", steps=230_000)


def kimi_k25_512() -> JobConfig:
    """K2.5 joint pretraining at 4K on 512 H100: tp8 pp32 ep8 etp1 (dp2).

    Why: half the GPUs hold the same 1T parameters, so each pipeline stage must hold half as
    many: pp 16 -> 32 (2 LLM layers per stage, stage 0 the ViT + 1 layer), TP and EP unchanged
    (the same node-local collectives). With dp=2 each DP rank runs 8,192 micro-batches per step,
    so the 31-stage bubble stays < 1%; Muon's state is split over only 2 ranks (16 GiB).
    Planned: 49 GiB on the busiest rank, 30% MFU at the full patch budget (stage 0's ViT is then
    1.7x a 2-layer stage) and 43% at half. Same batch and schedule as ``kimi_k25``: half the
    tokens per second.
    """
    return _k25(seq=4096, yarn_factor=1.0, recompute="selective", name="kimi_k25_512",
                parallel=ParallelConfig(tp=8, pp=32, cp=1, ep=8, etp=1, sequence_parallel=True,
                                        use_distributed_optimizer=True,
                                        pipeline_layout="Et|(tt|)*30,L"),
                global_batch=16384, patches=8192, stage="early_fusion", steps=230_000)


def kimi_k25_32k() -> JobConfig:
    """K2.5 long-context stage at 32K on 1,024 H100: tp8 pp16 cp4 ep8 etp1 (dp2), YaRN x8.

    Why: 8x longer packs make attention and activations 8x larger per sequence; context
    parallelism 4 splits each 32K pack into 2 x 4 load-balanced chunks (8K tokens per CP rank,
    enough for full GEMMs), so per-GPU activations per micro-batch match the 4K stage's at
    cp=1 x 2. The rest of the layout is ``kimi_k25``'s (weights and optimizer shards reshard
    only over DP: 8 -> 2). Full recompute (one layer input kept per layer) because stage 0
    holds 16 micro-batches in flight; selective recompute would plan 73 GiB, too close to 80.
    Planned: 57 GiB, 1.4% bubble, 26% MFU (the CP ring exchange and the all-to-all are the
    exposed cost). YaRN factor 8 from 4096; 2,048 x 32K = 67M tokens per step; 32K ViT patches
    per pack.
    """
    return _k25(seq=32768, yarn_factor=8.0, recompute="full", name="kimi_k25_32k",
                parallel=ParallelConfig(tp=8, pp=16, cp=4, ep=8, etp=1, sequence_parallel=True,
                                        use_distributed_optimizer=True,
                                        pipeline_layout="E,t*3|(t*4|)*14,ttL"),
                global_batch=2048, patches=32768, stage="joint", steps=5_000)


def kimi_k25_128k() -> JobConfig:
    """K2.5 long-context stage at 128K on 1,024 H100: tp8 pp16 cp8 ep8 etp1 (dp1), YaRN x32.

    Why: cp 4 -> 8 keeps 16K tokens per CP rank; with dp=1 each step is 512 micro-batches of
    one 128K pack through the same 16 stages. Full recompute. Planned: 59 GiB with 64K ViT
    patches per pack, 2.8% bubble, 26% MFU. YaRN factor 32 from 4096 (131,072 positions);
    512 x 128K = 67M tokens per step.
    """
    return _k25(seq=131072, yarn_factor=32.0, recompute="full", name="kimi_k25_128k",
                parallel=ParallelConfig(tp=8, pp=16, cp=8, ep=8, etp=1, sequence_parallel=True,
                                        use_distributed_optimizer=True,
                                        pipeline_layout="E,t*3|t*3|(t*4|)*13,t*3,L"),
                global_batch=512, patches=65536, stage="joint", steps=2_000)


def kimi_vl_a3b() -> JobConfig:
    """Kimi-VL-A3B joint pretraining at 8K on 64 H100: tp2 pp1 ep8 etp1 (dp32).

    Why: 16B parameters fit one GPU's worth of model parallelism once the 64 experts are spread:
    ep8 leaves 8 experts per layer per GPU (~4 GiB bf16), TP=2 with SP halves attention, dense
    and shared-expert weights and the activations of 8K packs; no pipeline (27 layers would need
    an uneven split and bring a bubble for no memory need). Selective recompute. Planned: 42 GiB
    at the full 16K-patch budget, 50% MFU. 1,024 x 8K = 8.4M tokens per step; 4.4T tokens is
    ~520k steps.
    """
    llm = dataclasses.replace(moonlight_llm(), recompute="selective", recompute_modules=SELECTIVE)
    return JobConfig(
        name="kimi_vl_a3b",
        model=_vlm(llm),
        parallel=ParallelConfig(tp=2, pp=1, cp=1, ep=8, etp=1, sequence_parallel=True,
                                use_distributed_optimizer=True),
        data=DataConfig(
            seq_length=8192, global_batch_size=1024, require_inputs=True,
            multimodal=MultimodalDataConfig(
                stage="joint", max_patches_per_micro_batch=16384, image_max_patches=4096,
                video_chunk_max_patches=1024, num_workers=4)),
        optim=_muon(lr=3e-4, warmup=500),
        train=TrainConfig(steps=520_000, eval_interval=1000, log_interval=10,
                          output_dir="runs/kimi_vl_a3b"),
        checkpoint=CheckpointConfig(save_interval=1000, async_save=True),
    )
