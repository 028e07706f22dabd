"""Activation memory per micro-batch: Korthikanti et al. (2022, "Reducing Activation Recomputation
in Large Transformer Models") adapted to MLA or GQA, DeepSeek-style MoE and MoonViT.

Korthikanti et al. count the tensors autograd keeps for the backward pass of one layer: for GPT
with tensor (t) and sequence parallelism, ``s b h (34 / t + 5 a s / (h t))`` bytes in 16-bit --
LayerNorm inputs, the inputs of every linear layer, Q, K, V, the softmax output and dropout
masks. We list the same kinds of tensors for our layers, in elements per *local token*
(``S / (cp * tp)`` tokens per GPU: sequence parallelism shards the token dimension of the
norm/residual regions by ``tp``; in TP regions a ``[S/cp, n/tp * d]`` tensor is ``n * d`` elements
per local token), 2 bytes each (bf16) unless marked fp32:

MLA attention (``h`` hidden, ``n`` heads, ``r_q``/``r_kv`` latent ranks, ``d_*`` head dims):
``h`` input-norm input, ``h`` down-projection input, ``r_q`` q-norm input, ``r_q`` q-up input,
``r_kv + d_rope`` kv-norm input + shared rope key, ``r_kv`` kv-up input, ``n d_rope`` +
``tp d_rope`` RoPE inputs (the rope key is gathered from the SP region), ``2 n d_qk`` Q and K
after RoPE, ``n d_v`` V, ``n d_v`` core-attention output (= o_proj input), ``n`` softmax
statistics in fp32 (flash attention). Without a fused kernel add the softmax output,
``n S / cp`` per local token (the Korthikanti ``5 a s / h`` term without dropout).

GQA attention (``n`` query heads, ``g`` key/value heads of dim ``d``; Qwen3): ``h`` input-norm
input, ``h`` ``linear_qkv`` input, ``(n + g) d`` q/k RMSNorm inputs (with ``qk_layernorm``),
``(n + 2 g) d`` Q and K after RoPE and V (flash attention keeps K and V per group, not repeated
per head), ``n d`` core-attention output, ``n`` softmax statistics in fp32. RoPE keeps no input
(its backward needs only cos/sin). No megatron recompute module covers Q, K, V here
(``mla_up_proj`` is MLA's).

Dense SwiGLU MLP (unfused, as our local spec builds it): ``h`` norm input, ``h`` fc1 input,
``2 f`` fc1 output (gate, up), ``f`` SiLU output, ``f`` fc2 input -> ``2h + 4f``.

MoE (balanced routing, ``k`` = top-k, ``E`` experts, ``F`` expert FFN, ``e`` = etp): ``h`` norm
input, ``h`` router/shared-expert input, ``4 E`` fp32 router logits and scores, ``k e h``
dispatched expert inputs (the expert-TP group gathers tokens), ``4 k F`` expert SwiGLU
intermediates, ``k h`` expert outputs kept for the probability-weighted combine, ``4 n_s F``
shared expert. torch ``grouped_mm`` experts (no Transformer Engine; ``models/experts.py``
``GroupedExperts``) keep ``2 k F`` instead of ``4 k F``: the fc1 output, from which backward
recomputes the SwiGLU (``moe_act`` recompute has nothing more to drop; ``moe`` drops it). They
also stack the ``E / ep`` local experts' weights (``3 F h / e`` each, bf16) while a layer runs
forward and again in backward: not kept between the two, but one stacked copy's worth of bytes
is alive while one layer runs (backward: the stacked fc2 gradient with the stacked fc1 weights,
then with the fc1 gradient), counted once like ``full`` recompute's rebuilt layer (``peak_extra``).
Before ``GroupedExperts`` autograd kept that copy per MoE layer per micro-batch in flight (K2.5 at
ep=8: 4.2 GB).

MoonViT per patch and layer (split over tp x cp ranks, issue 7's rule that no item is encoded
twice): ``10 h + 2 f`` (two LayerNorm inputs, qkv input, q k v, q k after RoPE, output, fc1 input
and output, GELU output) + ``2 n_heads`` fp32 statistics; the encoder output gathered over TP
(``tp h`` per local patch) and the projector (``8 h_v`` + ``2 I / tp`` per merged token).

Head (last stage, one micro-batch alive): final-norm input and output-layer input (``2h``),
logits ``V`` and their fp32 softmax for the cross entropy (``2V`` more; megatron's
vocab-parallel cross entropy keeps ``exp(logits)``).

The terms are what fused GPU kernels keep (Transformer Engine's LayerNorm+linear keeps the norm
input only, flash attention no softmax). megatron's local modules keep more -- each norm's output,
fp32 softmax inputs, router internals: on the CPU build these terms come to 0.48-0.59 of what
autograd saves per layer (``tests/planning/test_memory.py``), so plan local-spec runs with that
margin.

Recompute: ``full`` keeps one layer input (``h``) per layer and rebuilds one layer at a time
during backward (its activations counted once); ``selective`` drops the terms of the listed
megatron ``recompute_modules``: ``core_attn`` the softmax output; ``mla_up_proj`` Q, K, V and the
RoPE inputs; ``layernorm`` the norm outputs (inputs of the down-projections, fc1, router);
``mlp`` the dense SwiGLU intermediates; ``moe_act`` the expert SwiGLU intermediates; ``moe``
everything inside the MoE block after its input; ``shared_experts`` the shared expert's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from megatron_vlm.config.model import LLMConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig
from megatron_vlm.planning.costs import VisionBudget, padded_vocab

BF16 = 2


@dataclass(frozen=True)
class Term:
    """One saved tensor: elements per local token (or patch), and what recompute drops it."""

    name: str
    elements: float
    bytes_per_element: int = BF16
    recompute_module: str | None = None
    """megatron ``recompute_modules`` entry whose recompute frees it (None = kept)."""


def _sum(terms: Iterable[Term], dropped: set[str]) -> float:
    return sum(t.elements * t.bytes_per_element for t in terms
               if t.recompute_module is None or t.recompute_module not in dropped)


def llm_layer_terms(llm: LLMConfig, layer: int, *, tp: int, etp: int, cp: int,
                    seq_length: int, flash: bool = True,
                    torch_grouped_experts: bool = False) -> list[Term]:
    """Saved tensors of decoder layer ``layer`` per local token (see the module docstring);
    ``torch_grouped_experts``: the routed experts run as torch ``grouped_mm`` (no TE)."""
    h, n = llm.hidden_size, llm.num_attention_heads
    terms = [Term("attn_norm_in", h),
             Term("attn_down_in", h, recompute_module="layernorm")]
    terms += _gqa_terms(llm) if llm.attention == "gqa" else _mla_terms(llm, tp)
    terms.append(Term("softmax_stats", n, 4))
    if not flash:
        terms.append(Term("softmax_out", n * seq_length / cp, recompute_module="core_attn"))
    terms.append(Term("mlp_norm_in", h))
    if not llm.moe_layer_freq[layer]:
        f = llm.ffn_hidden_size
        return terms + [Term("fc1_in", h, recompute_module="layernorm"),
                        Term("swiglu", 4 * f, recompute_module="mlp")]
    k, fe = llm.moe_router_topk, llm.moe_ffn_hidden_size
    terms += [Term("router_in", h, recompute_module="layernorm"),
              Term("router_scores", 2 * llm.num_experts, 4, recompute_module="moe"),
              Term("expert_in", k * etp * h, recompute_module="moe"),
              Term("expert_fc1", 2 * k * fe, recompute_module="moe") if torch_grouped_experts
              else Term("expert_swiglu", 4 * k * fe, recompute_module="moe_act"),
              Term("expert_out", k * h, recompute_module="moe")]
    if llm.num_shared_experts:
        terms.append(Term("shared_swiglu", 4 * llm.num_shared_experts * fe,
                          recompute_module="shared_experts"))
    return terms


def _mla_terms(llm: LLMConfig, tp: int) -> list[Term]:
    """MLA's saved tensors after the input norm (module docstring)."""
    n, d_qk, d_v, d_rope = (llm.num_attention_heads, llm.qk_head_dim, llm.v_head_dim,
                            llm.qk_rope_head_dim)
    terms = []
    if llm.q_lora_rank is not None:
        terms += [Term("q_norm_in", llm.q_lora_rank), Term("q_up_in", llm.q_lora_rank)]
    return terms + [
        Term("kv_norm_in", llm.kv_lora_rank + d_rope),
        Term("kv_up_in", llm.kv_lora_rank),
        Term("rope_in", n * d_rope + tp * d_rope, recompute_module="mla_up_proj"),
        Term("qk", 2 * n * d_qk, recompute_module="mla_up_proj"),
        Term("v", n * d_v, recompute_module="mla_up_proj"),
        Term("attn_out", n * d_v),
    ]


def _gqa_terms(llm: LLMConfig) -> list[Term]:
    """GQA's saved tensors after the input norm (module docstring): q/k norm inputs, Q and K
    after RoPE and V (``g`` key/value heads), the core-attention output."""
    n, g, d = llm.num_attention_heads, llm.query_groups, llm.head_dim
    terms = [Term("qk_norm_in", (n + g) * d)] if llm.qk_layernorm else []
    return terms + [Term("qkv", (n + 2 * g) * d), Term("attn_out", n * d)]


def _dropped(recompute: str, modules: Iterable[str]) -> set[str]:
    if recompute != "selective":
        return set()
    out = set(modules)
    if "moe" in out:
        out |= {"moe_act"}
    return out


def expert_stack_bytes(llm: LLMConfig, *, ep: int, etp: int) -> float:
    """One stacked copy of an MoE layer's local expert weights (fc1 ``2F x h`` and fc2
    ``h x F`` per expert, split over expert TP), bf16: what torch ``grouped_mm`` experts stack."""
    if llm.num_experts is None:
        return 0.0
    return llm.num_experts / ep * 3 * llm.moe_ffn_hidden_size * llm.hidden_size / etp * BF16


def llm_layer_bytes(llm: LLMConfig, layer: int, *, tp: int, etp: int, cp: int,
                    seq_length: int, recompute: str = "none",
                    recompute_modules: Iterable[str] = ("core_attn",),
                    flash: bool = True, ep: int = 1,
                    torch_grouped_experts: bool = False) -> dict[str, float]:
    """Activation bytes of one layer for one micro-batch on one GPU.

    Returns ``kept`` (held until the layer's backward) and ``peak_extra`` (alive only while this
    layer runs: what ``full`` recompute rebuilds, and with ``torch_grouped_experts`` the stacked
    expert weights of an MoE layer; 0 otherwise).
    """
    local_tokens = seq_length / (cp * tp)
    terms = llm_layer_terms(llm, layer, tp=tp, etp=etp, cp=cp, seq_length=seq_length,
                            flash=flash, torch_grouped_experts=torch_grouped_experts)
    stack = (expert_stack_bytes(llm, ep=ep, etp=etp)
             if torch_grouped_experts and llm.moe_layer_freq[layer] else 0.0)
    full = _sum(terms, set()) * local_tokens
    if recompute == "full":
        return {"kept": llm.hidden_size * BF16 * local_tokens, "peak_extra": full + stack}
    return {"kept": _sum(terms, _dropped(recompute, recompute_modules)) * local_tokens,
            "peak_extra": stack}


def head_bytes(llm: LLMConfig, *, tp: int, cp: int, seq_length: int) -> float:
    """Final norm, output layer input, logits and their fp32 softmax for one micro-batch."""
    local_tokens = seq_length / (cp * tp)
    vocab = padded_vocab(llm.vocab_size, tp)
    return local_tokens * (2 * llm.hidden_size * BF16 + vocab * BF16 + vocab * 4)


def vision_bytes(vision: VisionConfig, projector: ProjectorConfig, budget: VisionBudget, *,
                 tp: int, cp: int, recompute: str = "none", flash: bool = True) -> float:
    """ViT + projector activations of one micro-batch on one GPU (``recompute``: ``none`` or
    ``full``; ``full`` keeps each layer's input and one layer's activations)."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    local_patches = budget.num_patches / (tp * cp)
    per_layer = (10 * h + 2 * f) * BF16 + 2 * vision.num_attention_heads * 4
    if not flash:
        per_layer += vision.num_attention_heads * budget.patches_per_item * BF16 / tp
    if recompute == "full":
        layers = vision.num_layers * h * BF16 + per_layer
    else:
        layers = vision.num_layers * per_layer
    merged = budget.merged_tokens(vision.merge_size) / cp
    proj = merged * (8 * projector.vision_hidden_size * BF16
                     + 2 * projector.intermediate_size / tp * BF16)
    return local_patches * (layers + tp * h * BF16) + proj
