"""Parameter counts of the LLM: closed form from ``LLMConfig`` (SPEC §2), counted from a built
module, and a way to build the full-size model on the ``meta`` device (no memory, seconds).

Groups (same keys in both counts, so a mismatch names its part):

* ``embedding``: input word embeddings, ``vocab x hidden``.
* ``attention``: MLA projections and the two latent RMSNorms (q_a_layernorm, kv_a_layernorm);
  GQA: the fused q/k/v projection (+ bias), the per-head q/k RMSNorms and the output projection.
* ``layer_norms``: per-layer input and pre-MLP RMSNorms (with ``sandwich_norms`` also the
  post-attention and post-MLP ones) and the final norm.
* ``dense_mlp``: SwiGLU FFN of the first ``num_dense_layers`` layers.
* ``router``: the MoE gate ``num_experts x hidden`` (the expert bias is a buffer, not counted).
* ``routed_experts``: all routed experts.
* ``shared_experts``: the shared expert(s).
* ``output_layer``: the untied output head (0 when tied).
* ``mtp``: the multi-token-prediction layers (``mtp_num_layers``): per layer megatron's
  ``enorm``, ``hnorm``, ``eh_proj`` (``2 hidden x hidden``), final norm and one decoder layer of
  the last layer's kind (GLM-4.5-Air: MoE); they share the embedding and output head.

``activated`` counts what one token uses: everything except the routed experts it is not sent to
(``topk`` of ``num_experts`` per MoE layer), embeddings and head included.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

from megatron_vlm.config.model import LLMConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.planning.costs import padded_vocab as _padded_vocab

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

PARAM_GROUPS = (
    "embedding", "attention", "layer_norms", "dense_mlp", "router", "routed_experts",
    "shared_experts", "output_layer", "mtp",
)




def _mla_layer_params(llm: LLMConfig) -> int:
    """One layer's MLA projections and latent RMSNorms."""
    h, n = llm.hidden_size, llm.num_attention_heads
    d_qk, d_v, d_rope = llm.qk_head_dim, llm.v_head_dim, llm.qk_rope_head_dim
    if llm.q_lora_rank is None:
        q = h * n * d_qk  # q_proj
    else:
        q = h * llm.q_lora_rank + llm.q_lora_rank + llm.q_lora_rank * n * d_qk  # down, norm, up
    kv = (
        h * (llm.kv_lora_rank + d_rope)  # kv_down: latent + shared rope key
        + llm.kv_lora_rank  # kv_a_layernorm
        + llm.kv_lora_rank * n * (llm.qk_nope_head_dim + d_v)  # kv_up: k_nope and v per head
    )
    return q + kv + n * d_v * h  # + o_proj


def _gqa_layer_params(llm: LLMConfig) -> int:
    """One layer's GQA attention: fused q/k/v (``n`` query heads, ``g`` key/value heads of dim
    ``d``), its bias, the per-head q/k RMSNorms, the output projection (and its bias with
    ``add_bias_linear``) and the per-head sinks (GPT-OSS)."""
    h, n, g, d = llm.hidden_size, llm.num_attention_heads, llm.query_groups, llm.head_dim
    qkv_rows = (n + 2 * g) * d
    bias = qkv_rows if (llm.add_qkv_bias or llm.add_bias_linear) else 0
    qk_norms = 2 * d if llm.qk_layernorm else 0
    out_bias = h if llm.add_bias_linear else 0
    sinks = n if llm.attention_sinks else 0
    return h * qkv_rows + bias + qk_norms + n * d * h + out_bias + sinks


def _swiglu_params(h: int, ffn: int, bias: bool) -> int:
    """A gated MLP ``hidden -> [gate; up] (2 ffn) -> hidden``, with megatron's fc1/fc2 biases
    (``add_bias_linear``)."""
    return 3 * h * ffn + ((2 * ffn + h) if bias else 0)


def count_llm_params_closed_form(llm: LLMConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of the whole (unsharded) LLM from its dimensions.

    Args:
        llm: the LLM config.
        tp: tensor-parallel size, only for the vocabulary padding megatron applies
            (``vocab`` rounded up to a multiple of ``lcm(128, tp)``).

    Returns:
        One count per group of :data:`PARAM_GROUPS`, plus ``total``, ``activated`` (per token) and
        ``expert`` (one routed expert).
    """
    h = llm.hidden_size
    vocab = _padded_vocab(llm.vocab_size, tp)
    layer_attention = _gqa_layer_params(llm) if llm.attention == "gqa" else _mla_layer_params(llm)
    layer_norms = (4 if llm.sandwich_norms else 2) * h

    num_moe = llm.num_moe_layers
    num_dense = llm.num_layers - num_moe
    bias = llm.add_bias_linear
    expert = _swiglu_params(h, llm.moe_ffn_hidden_size, bias)
    shared = (_swiglu_params(h, llm.num_shared_experts * llm.moe_ffn_hidden_size, bias)
              if llm.num_shared_experts else 0)
    dense = _swiglu_params(h, llm.ffn_hidden_size, bias)
    num_experts = llm.num_experts or 0
    router = num_experts * (h + 1) if bias else num_experts * h
    moe_layer = router + num_experts * expert + shared
    last_is_moe = llm.moe_layer_freq[-1] == 1
    mtp_layer = (3 * h + 2 * h * h + layer_attention + layer_norms
                 + (moe_layer if last_is_moe else dense))
    counts = {
        "embedding": vocab * h,
        "attention": llm.num_layers * layer_attention,
        "layer_norms": llm.num_layers * layer_norms + h,
        "dense_mlp": num_dense * dense,
        "router": num_moe * router,
        "routed_experts": num_moe * num_experts * expert,
        "shared_experts": num_moe * shared,
        "output_layer": vocab * h if llm.untie_embeddings else 0,
        "mtp": llm.mtp_num_layers * mtp_layer,
    }
    total = sum(counts.values())
    inactive_layers = num_moe + (llm.mtp_num_layers if last_is_moe else 0)
    inactive = inactive_layers * (num_experts - llm.moe_router_topk) * expert
    return {**counts, "total": total, "activated": total - inactive, "expert": expert}


# megatron-core 0.16.1 parameter names (local spec) -> group; first match wins.
_GROUP_PATTERNS = (
    ("mtp", re.compile(r"(^|\.)mtp\.layers\.")),
    ("embedding", re.compile(r"(^|\.)embedding\.word_embeddings\.")),
    ("output_layer", re.compile(r"(^|\.)output_layer\.")),
    ("attention", re.compile(r"\.self_attention\.")),
    ("layer_norms", re.compile(r"(input_layernorm|pre_mlp_layernorm|final_layernorm"
                               r"|post_self_attn_layernorm|post_mlp_layernorm)\.")),
    ("router", re.compile(r"\.mlp\.router\.")),
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("dense_mlp", re.compile(r"\.mlp\.linear_fc[12]\.")),
)


def count_module_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters held by ``model`` (this rank's shard under TP/EP/PP), per group and ``total``.

    Works on meta tensors. A parameter shared by two modules (tied embeddings) counts once.

    Raises:
        ValueError: a parameter name matches no group (the model has a part this count does not
            know; extend ``_GROUP_PATTERNS``).
    """
    counts = dict.fromkeys(PARAM_GROUPS, 0)
    for name, param in model.named_parameters():  # deduplicates shared parameters
        for group, pattern in _GROUP_PATTERNS:
            if pattern.search(name):
                counts[group] += param.numel()
                break
        else:
            raise ValueError(f"parameter {name!r} belongs to no group of {PARAM_GROUPS}")
    counts["total"] = sum(counts[g] for g in PARAM_GROUPS)
    return counts


class _AllocateOnMeta(TorchFunctionMode):
    """Every tensor a torch call creates or moves lands on ``meta``.

    megatron-core 0.16.1 allocates weights with
    ``torch.empty(..., device=torch.cuda.current_device())`` (``tensor_parallel/layers.py:873``,
    ``moe/experts.py:184``), moves buffers with ``.to(device=...)``
    (``rotary_pos_embedding.py:162``, ``yarn_rotary_pos_embedding.py:122``), and creates the router
    weight with no device at all (``moe/router.py:54``). ``with torch.device('meta')`` covers only
    the last kind, so this mode rewrites explicit devices too.
    It sits above the CPU shim's cuda->cpu mode, so it sees (and rewrites) calls first.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs["device"] = "meta"
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], "meta", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def allocate_on_meta() -> Iterator[None]:
    """Within this context, torch and megatron-core allocate every tensor on ``meta``."""
    with torch.device("meta"), _AllocateOnMeta():
        yield


def build_llm_on_meta(
    llm: LLMConfig,
    parallel: ParallelConfig,
    params_dtype: str = "bf16",
    *,
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
) -> GPTModel:
    """This rank's part of the LLM with every parameter and buffer on ``meta`` (no memory).

    The same config, spec and ``GPTModel`` arguments as :func:`megatron_vlm.models.llm.build_llm`,
    but with ``perform_initialization=False`` (initialising 1T meta parameters through megatron's
    CPU-init path costs 4x the build time) and ``use_cpu_initialization=True`` (no per-rank RNG
    forks). Kimi K2.5 (61 layers, 60 x 384 ``SequentialMLP`` experts) builds in ~6 s on one core.
    Process groups for ``parallel``: ``pg_collection``, or (None) those ``init_distributed``
    made (as for ``build_llm``).
    """
    from megatron_vlm.models.llm import build_transformer_config, gpt_model_args, llm_kernel_choice
    from megatron_vlm.parallel.runtime import groups_or_default

    choice = llm_kernel_choice(llm, parallel, params_dtype)  # one choice for config and spec
    config = build_transformer_config(llm, parallel, params_dtype, choice)
    config.use_cpu_initialization = True
    config.perform_initialization = False
    with allocate_on_meta():
        # The class and architecture arguments of models/llm.py::build_llm (gpt_model_args); the
        # tiny-model test checks that the two builds have the same parameter names and shapes.
        model_class, kwargs = gpt_model_args(llm, parallel, config, choice)
        return model_class(
            **kwargs,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=groups_or_default(pg_collection, required=True),
        )
