"""Parameter counts: closed form vs megatron-built models (meta for full size, real for tiny) vs
counts written out here from the HF checkpoint tensor shapes."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.models.param_count import (
    PARAM_GROUPS,
    build_llm_on_meta,
    count_llm_params_closed_form,
    count_module_params,
)
from megatron_vlm.recipes.kimi import kimi_k25_llm, moonlight_llm
from megatron_vlm.recipes.tiny import tiny_llm


@pytest.fixture(scope="module")
def process_groups():
    """A world-size-1 gloo group and megatron's model-parallel state at tp=pp=ep=1, whatever an
    earlier test left behind (groups of another layout are made again). Left initialised:
    megatron's state is process-global and other modules reuse it."""
    from megatron_vlm.parallel.init import ensure_single_process_groups

    ensure_single_process_groups(seed=1234)


def _activated_from_module(model: torch.nn.Module, topk: int) -> int:
    """Activated parameters measured on the module: drop, per MoE layer, the experts a token does
    not use (each layer's routed-expert parameters / its expert count x (experts - topk))."""
    total = count_module_params(model)["total"]
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        local = list(experts.local_experts)
        per_expert = sum(p.numel() for p in local[0].parameters())
        assert all(sum(p.numel() for p in e.parameters()) == per_expert for e in local)
        total -= (len(local) - topk) * per_expert
    return total


def test_kimi_k25_meta_build_matches_closed_form(process_groups) -> None:
    llm = kimi_k25_llm()
    # Written out from the HF checkpoint shapes (moonshotai/Kimi-K2 config: hidden 7168,
    # 61 layers, 64 heads, q_lora 1536, kv_lora 512, head dims 128/64/128, 384 experts of 2048,
    # top-8, 1 shared, dense FFN 18432 in layer 0, vocab 163840, untied head).
    attention_layer = (
        1536 * 7168  # q_a_proj
        + 1536  # q_a_layernorm
        + (64 * 192) * 1536  # q_b_proj: 64 heads x (128 nope + 64 rope)
        + (512 + 64) * 7168  # kv_a_proj_with_mqa: latent 512 + shared rope key 64
        + 512  # kv_a_layernorm
        + (64 * (128 + 128)) * 512  # kv_b_proj: 64 heads x (k_nope 128 + v 128)
        + 7168 * (64 * 128)  # o_proj
    )
    norms_layer = 2 * 7168  # input_layernorm, post_attention_layernorm
    dense_mlp = 3 * 18432 * 7168  # gate_proj, up_proj, down_proj
    expert = 3 * 2048 * 7168
    moe_layer = 384 * 7168 + 384 * expert + 1 * expert  # gate + routed + shared
    embed = 163840 * 7168
    total = 61 * (attention_layer + norms_layer) + dense_mlp + 60 * moe_layer + embed + 7168 + embed
    activated = total - 60 * (384 - 8) * expert

    closed = count_llm_params_closed_form(llm)
    assert closed["total"] == total == 1_026_408_209_408
    assert closed["activated"] == activated == 32_861_477_888
    # Published: "1T total, 32B activated" (Kimi K2 model card).
    assert 1.02e12 < total < 1.04e12 and 32.0e9 < activated < 33.5e9

    start = time.perf_counter()
    model = build_llm_on_meta(llm, ParallelConfig(), params_dtype="bf16")
    build_s = time.perf_counter() - start
    print(f"kimi_k25 meta build: {build_s:.1f} s")
    assert build_s < 45, f"meta build took {build_s:.1f} s"
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}

    counted = count_module_params(model)
    assert {g: counted[g] for g in PARAM_GROUPS} == {g: closed[g] for g in PARAM_GROUPS}
    assert counted["total"] == closed["total"]
    assert _activated_from_module(model, topk=8) == closed["activated"]
    # The expert bias is a buffer (in no optimizer), one per MoE layer.
    biases = [n for n, _ in model.named_buffers() if n.endswith("router.expert_bias")]
    assert len(biases) == 60


def test_kimi_vl_a3b_meta_build_matches_closed_form(process_groups) -> None:
    llm = moonlight_llm()
    # From the HF checkpoint shapes (moonshotai/Moonlight-16B-A3B: hidden 2048, 27 layers,
    # 16 heads, q_proj (no q_lora), kv_lora 512, 64 experts of 1408, top-6, 2 shared, dense FFN
    # 11264 in layer 0, vocab 163840, untied head).
    attention_layer = (
        (16 * 192) * 2048  # q_proj
        + (512 + 64) * 2048  # kv_a_proj_with_mqa
        + 512  # kv_a_layernorm
        + (16 * 256) * 512  # kv_b_proj
        + 2048 * (16 * 128)  # o_proj
    )
    expert = 3 * 1408 * 2048
    moe_layer = 64 * 2048 + 64 * expert + 2 * expert
    embed = 163840 * 2048
    total = (
        27 * (attention_layer + 2 * 2048) + 3 * 11264 * 2048 + 26 * moe_layer
        + embed + 2048 + embed
    )
    activated = total - 26 * (64 - 6) * expert

    closed = count_llm_params_closed_form(llm)
    assert closed["total"] == total == 15_960_108_544
    assert closed["activated"] == activated == 2_914_774_528
    # Published: "16B total, 3B activated" (Moonlight / Kimi-VL-A3B model cards).
    assert 15.5e9 < total < 16.5e9 and 2.5e9 < activated < 3.5e9

    model = build_llm_on_meta(llm, ParallelConfig(), params_dtype="bf16")
    counted = count_module_params(model)
    assert {g: counted[g] for g in PARAM_GROUPS} == {g: closed[g] for g in PARAM_GROUPS}
    assert _activated_from_module(model, topk=6) == closed["activated"]


def test_tiny_real_build_matches_closed_form_and_meta(process_groups) -> None:
    from megatron_vlm.models.llm import build_llm

    llm = tiny_llm()
    model = build_llm(llm, ParallelConfig(), params_dtype="fp32")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    closed = count_llm_params_closed_form(llm)
    counted = count_module_params(model)
    assert {g: counted[g] for g in PARAM_GROUPS} == {g: closed[g] for g in PARAM_GROUPS}
    assert counted["total"] == closed["total"] == sum(p.numel() for p in model.parameters())
    assert _activated_from_module(model, topk=llm.moe_router_topk) == closed["activated"]

    # The meta builder builds the same model as build_llm: same names, shapes, dtypes.
    meta = build_llm_on_meta(llm, ParallelConfig(), params_dtype="fp32")
    real_shapes = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    meta_shapes = {n: (tuple(p.shape), p.dtype) for n, p in meta.named_parameters()}
    assert meta_shapes == real_shapes
    assert {n: tuple(b.shape) for n, b in meta.named_buffers()} == {
        n: tuple(b.shape) for n, b in model.named_buffers()
    }


def test_closed_form_variants() -> None:
    tiny = tiny_llm()
    # Tied embeddings: no output layer.
    tied = count_llm_params_closed_form(type(tiny)(**{**tiny.__dict__, "untie_embeddings": False}))
    assert tied["output_layer"] == 0
    assert tied["total"] == count_llm_params_closed_form(tiny)["total"] - 1024 * 64
    # Vocab padding to lcm(128, tp): 1000 -> 1024 at tp=1 and tp=8 and tp=16 (Megatron-LM's
    # 128 * tp would give 2048 at tp=16); tp=3 pads to a multiple of 384 -> 1152.
    v1000 = type(tiny)(**{**tiny.__dict__, "vocab_size": 1000})
    assert count_llm_params_closed_form(v1000)["embedding"] == 1024 * 64
    assert count_llm_params_closed_form(v1000, tp=8)["embedding"] == 1024 * 64
    assert count_llm_params_closed_form(tiny, tp=16)["embedding"] == 1024 * 64
    assert count_llm_params_closed_form(v1000, tp=3)["embedding"] == 1152 * 64
    # Dense model: everything activated.
    dense = count_llm_params_closed_form(type(tiny)(**{**tiny.__dict__, "num_experts": None}))
    assert dense["router"] == dense["routed_experts"] == dense["shared_experts"] == 0
    assert dense["dense_mlp"] == 3 * 3 * 64 * 192
    assert dense["activated"] == dense["total"]
