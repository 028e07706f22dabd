"""Shared pieces of the model benchmarks (LLM/VLM MFU, ViT packing, optimizer step).

* the K2-proxy LLM of SPEC §8 and tiny stand-ins for the CPU smoke runs;
* the ``stock+sdpa`` baseline: megatron-core's local GPT spec with only ``core_attention``
  swapped for :class:`StockSDPAAttention`, a minimal unfused SDPA over padded ``[s, b]`` batches
  (stock ``DotProductAttention`` rejects MLA's k/v head dims; SPEC §6);
* single-process set-up, megatron DDP wrapping identical for every variant, packed text batches,
  timing with device synchronisation, peak memory, device peak TFLOP/s.

Benchmarks are not tests: numbers go to ``benchmarks/results/*.json`` via ``common.write_result``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import resource
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from megatron_vlm.config.model import LLMConfig

#: Dense bf16 tensor-core peak per device (TFLOP/s), from the vendors' datasheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """Peak dense TFLOP/s of this device for ``dtype`` and where the number comes from; None on
    CPU (no MFU is reported for CPU runs). ``override``: ``--peak-tflops``, used as given."""
    if override:
        return override, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "CPU: no peak defined, MFU not reported"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            if dtype != "bf16":
                return None, f"{name}: only the bf16 peak is tabulated"
            return value, f"{name} dense bf16 datasheet peak"
    return None, f"{name}: unknown device, pass --peak-tflops"


def k2_proxy_llm(vocab_size: int = 32768) -> LLMConfig:
    """SPEC §8's one-GPU K2-proxy: Moonlight layer shapes, MoE-dominated."""
    return LLMConfig(
        vocab_size=vocab_size, hidden_size=2048, num_layers=6, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, ffn_hidden_size=11264, num_dense_layers=1, num_experts=64,
        moe_router_topk=6, num_shared_experts=2, moe_ffn_hidden_size=1408,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.446,
        moe_router_enable_expert_bias=True, moe_token_dispatcher="alltoall", rope_theta=50000.0,
        max_position_embeddings=4096,
    )


def smoke_llm(vocab_size: int = 1024) -> LLMConfig:
    """The tiny recipe's LLM (K2-shaped, 3 layers) for CPU smoke runs."""
    from megatron_vlm.recipes.tiny import tiny_llm

    return tiny_llm(vocab_size=vocab_size)


def llm_label(smoke: bool) -> str:
    return "smoke (tiny_llm)" if smoke else "K2-proxy (SPEC §8)"


def init_single_process() -> None:
    """torch.distributed world of one and megatron's groups (idempotent)."""
    from megatron_vlm.parallel.init import ensure_single_process_groups

    ensure_single_process_groups()


def can_run(name: str, smoke: bool) -> bool:
    """False (after saying so) for a GPU-sized run without CUDA; a smoke run disables
    torch.compile (unless the environment sets it)."""
    if not smoke and not torch.cuda.is_available():
        print(f"{name}: the GPU-sized run needs CUDA (none visible); skipped. "
              "Use --smoke for the CPU smoke run.")
        return False
    if smoke:
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    return True


def text_llm_and_batches(cfg: dict, smoke: bool):
    """``(llm, micro-batches)`` of the text benchmarks: the tiny LLM (smoke) or the K2 proxy, and
    ``cfg["micro_batches"]`` packed random-text batches; megatron's groups initialised."""
    llm = smoke_llm() if smoke else k2_proxy_llm()
    init_single_process()
    batches = packed_text_batches(cfg["micro_batches"], cfg["seq_length"], llm.vocab_size, seed=0,
                                  median=cfg["doc_median"])
    return llm, batches


def release_memory() -> None:
    """After a variant's objects are deleted: collect them and return CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> dict:
    """Peak device memory (CUDA: max allocated since the last reset; CPU: process max RSS)."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated",
                "gib": torch.cuda.max_memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "cpu_max_rss", "gib": rss_kib / 2**20}


def timed(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds of ``iters`` calls of ``fn`` after ``warmup`` calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- data


def text_documents(num_tokens: int, seq_length: int, vocab: int, rng: np.random.Generator,
                   median: int = 1024, sigma: float = 1.0) -> list[list[int]]:
    """Random-token documents with log-normal lengths (median ``median``, clipped to
    [16, seq_length - 8]) totalling at least ``num_tokens`` tokens."""
    docs, total = [], 0
    while total < num_tokens:
        n = int(np.clip(rng.lognormal(math.log(median), sigma), 16, seq_length - 8))
        docs.append(rng.integers(3, vocab, size=n).tolist())
        total += n
    return docs


def packed_text_batches(num_batches: int, seq_length: int, vocab: int, seed: int = 0,
                        pad_to_multiple: int = 8, median: int = 1024) -> list:
    """``num_batches`` packed micro-batches of ``seq_length`` (first-fit in stream order)."""
    from megatron_vlm.data.packing import pack_documents, padded_length

    rng = np.random.default_rng(seed)
    docs = text_documents(num_batches * seq_length * 2, seq_length, vocab, rng, median)
    batches, cur, used = [], [], 0
    for d in docs:
        n = padded_length(len(d), pad_to_multiple)
        if used + n > seq_length:
            batches.append(pack_documents(cur, seq_length, 0, pad_to_multiple))
            if len(batches) == num_batches:
                return batches
            cur, used = [], 0
        cur.append(d)
        used += n
    raise RuntimeError("not enough documents drawn")  # pragma: no cover - 2x margin above


def document_stats(batches) -> dict:
    from megatron_vlm.training.flops import document_length_stats

    real = sq = docs = 0
    for b in batches:
        r, s = document_length_stats(b.cu_seqlens.tolist())
        real, sq, docs = real + r, sq + s, docs + len(b.cu_seqlens) - 1
    tokens = sum(b.seq_length for b in batches)
    return {"tokens": tokens, "real_tokens": real, "seqlen_squared_sum": sq, "documents": docs,
            "padding_fraction": 1 - real / tokens, "mean_document_tokens": real / docs}


# --------------------------------------------------------------------------- stock+sdpa


class StockSDPAAttention(torch.nn.Module):
    """The ``stock+sdpa`` core attention: the least change that lets megatron-core's local spec
    build MLA without Transformer Engine. Padded ``[s, b, np, hn]`` input only (no packing, no
    context parallelism, no max logits), causal over the whole sequence, one
    ``F.scaled_dot_product_attention`` call (torch picks its kernel)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__()
        self.config = config
        k = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("stock+sdpa takes padded [s, b] batches only (no THD packing)")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask.bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def stock_block_spec(config):
    """megatron-core's local decoder spec, only ``core_attention`` replaced."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                       normalization="RMSNorm")
    block.layer_specs = [
        dataclasses.replace(s, submodules=dataclasses.replace(
            s.submodules, self_attention=dataclasses.replace(
                s.submodules.self_attention, submodules=dataclasses.replace(
                    s.submodules.self_attention.submodules,
                    core_attention=StockSDPAAttention))))
        for s in block.layer_specs
    ]
    return block


# --------------------------------------------------------------------------- models


def build_llm_variant(variant: str, llm: LLMConfig, params_dtype: str, kernels=None):
    """``ours`` (our specs, kernels resolved on this machine) or ``stock+sdpa``, with the same
    ``MLATransformerConfig`` (identical flags), DDP-wrapped identically. Returns
    ``(ddp_model, choice_description)``."""
    from megatron.core.models.gpt import GPTModel

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import (
        build_transformer_config,
        llm_block_spec,
        llm_head_dims,
        padded_vocab_size,
    )
    from megatron_vlm.models.specs import resolve_kernels

    parallel = ParallelConfig()
    choice = resolve_kernels(kernels, params_dtype=params_dtype,
                             attention_dropout=llm.attention_dropout, head_dims=llm_head_dims(llm))
    if variant == "ours":
        config = build_transformer_config(llm, parallel, params_dtype, choice)
        spec, label = llm_block_spec(config, choice=choice), choice.describe()
    elif variant == "stock+sdpa":
        label = "megatron local spec + StockSDPAAttention"
        if choice.backend == "te":
            # The local spec cannot take TE's grouped MLP or FP8 flags; all others stay equal.
            choice = dataclasses.replace(choice, moe_grouped_gemm=False, fp8=False,
                                         experts="sequential")
            label += " (TE-only flags moe_grouped_gemm/fp8 off)"
        config = build_transformer_config(llm, parallel, params_dtype, choice)
        spec = stock_block_spec(config)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose ours or stock+sdpa")
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=spec,
                     vocab_size=padded_vocab_size(llm.vocab_size, 1),
                     max_sequence_length=llm.max_position_embeddings,
                     share_embeddings_and_output_weights=not llm.untie_embeddings,
                     position_embedding_type="none")
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return wrap_ddp(model), label


def wrap_ddp(model, muon: bool = False):
    """megatron DDP exactly as ``training/model_setup.py`` builds it for one chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False,
                                                 check_for_nan_in_grad=False, bucket_size=None),
        module=model)
    ddp.config.finalize_model_grads_func = finalize_model_grads
    ddp.config.no_sync_func = ddp.no_sync
    return ddp


def stock_forward_step(data_iterator, model):
    """``forward_step`` for ``stock+sdpa``: the packed tokens as one padded causal sequence
    (documents see earlier documents, as in any unpacked padded batch), no padding mask."""
    from megatron_vlm.training.step import loss_func

    batch = next(data_iterator)
    dev = next(model.parameters()).device
    output = model(input_ids=batch.tokens.to(dev), position_ids=batch.position_ids.to(dev),
                   attention_mask=None, labels=batch.labels.to(dev))
    return output, partial(loss_func, batch.loss_mask.to(dev))


def forward_backward(model, batches, seq_length: int, forward_step=None) -> None:
    """megatron's schedule (no pipeline) over ``batches``: gradients accumulate in DDP buffers."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlm.training.step import forward_step as packed_forward_step

    get_forward_backward_func()(
        forward_step_func=forward_step or packed_forward_step, data_iterator=iter(batches),
        model=[model], num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=1, forward_only=False)


def environment() -> dict:
    """Run settings that change numbers (threads, compile switch, allocator)."""
    return {"torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "TORCH_COMPILE_DISABLE": os.environ.get("TORCH_COMPILE_DISABLE"),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


def parse_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """``common.parse_args`` options plus the model benchmarks' ``--attention-kernel``;
    ``extra`` adds a benchmark's own options."""
    from benchmarks.common import RESULTS_DIR

    p = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, a few seconds")
    p.add_argument("--out-dir", default=None, help=f"result directory (default {RESULTS_DIR})")
    p.add_argument("--attention-kernel", default="auto",
                   choices=["auto", "sdpa_mask", "sdpa_doc", "flex", "varlen"],
                   help="model.kernels.attention_kernel for our layers (default: auto)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU when the device is not tabulated")
    return p.parse_args(argv)
