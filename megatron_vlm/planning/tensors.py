"""The parameter tensors one GPU holds, written out from the configs (no model is built).

For each model chunk (virtual pipeline stage) of a pipeline rank: names, shapes and dtypes in
module order, as this project builds them with megatron-core 0.16.1's local spec:

* MLA: ``linear_q_down_proj`` and ``linear_kv_down_proj`` are TP-*duplicated* (whole on every TP
  rank, ``models/linear.py``); ``linear_q_up_proj`` / ``linear_q_proj`` / ``linear_kv_up_proj``
  are column-parallel, ``linear_proj`` row-parallel; RMSNorm weights stay fp32
  (``models/norm.py``) in a bf16 model.
* GQA (``attention: gqa``, Qwen3): megatron's ``SelfAttention`` -- ``linear_proj`` row-parallel,
  one fused ``linear_qkv`` of ``(heads + 2 groups) x head_dim`` rows split over TP by whole
  query groups (+ its bias with ``add_qkv_bias``), per-head ``q_layernorm`` / ``k_layernorm``
  ``[head_dim]`` (fp32, whole on every TP rank) with ``qk_layernorm``.
* GPT-OSS: per-head ``core_attention.softmax_offset`` sinks and ``add_bias_linear``'s biases
  (``linear_proj``, router, every ``linear_fc1``/``linear_fc2``) after their weights.
* MoE: the router ``[experts, hidden]`` is replicated; ``experts / ep`` local experts per rank
  (megatron's ``SequentialMLP``: ``linear_fc1 [2 F / etp, h]``, ``linear_fc2 [h, F / etp]``);
  shared experts are a TP-sharded SwiGLU MLP.
* Vocabulary padded to ``lcm(128, tp)`` and split over TP (embedding on the first stage, the output
  layer on the last; a tied head is a second copy on the last stage when ``pp > 1``).
* MoonViT (first stage): patch conv, position table, qkv/proj/MLP with biases (TP-sharded in
  ``model.vision.parallel_mode='tp'``, whole on every TP rank in ``split`` mode), fp32
  LayerNorms; the projector (always TP-sharded) keeps the params dtype in its LayerNorm.

``tests/planning`` checks these lists against models built on the ``meta`` device under
several TP/EP/PP layouts (names, shapes, dtypes, order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_vlm.config.model import LLMConfig, ModelConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig
from megatron_vlm.families import family_costs
from megatron_vlm.planning.costs import padded_vocab

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
_EMBEDDING_OR_OUTPUT = ("word_embeddings", "output_layer", "pos_embed")


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor on one GPU."""

    name: str
    """Name within its model chunk (megatron / this project's module names)."""
    shape: tuple[int, ...]
    dtype: str
    """``bf16`` or ``fp32``."""
    expert: bool = False
    """A routed expert's weight under expert parallelism (megatron ``allreduce=False``): its own
    DDP buffer, optimizer state sharded over the expert data-parallel group."""
    trainable: bool = True
    """False for a frozen module (no gradient, no optimizer state)."""

    @property
    def numel(self) -> int:
        out = 1
        for d in self.shape:
            out *= d
        return out

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def uses_muon(self, router_in_muon: bool = True) -> bool:
        """Muon's rule (``optim/param_groups.py``): 2-D, not an embedding/output/position table,
        the router only with ``router_in_muon``."""
        if len(self.shape) != 2 or any(p in self.name for p in _EMBEDDING_OR_OUTPUT):
            return False
        return router_in_muon or not self.name.endswith("router.weight")


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"{what}={size} is not divisible by {parts}")
    return size // parts


def llm_layer_tensors(llm: LLMConfig, layer: int, prefix: str, dtype: str, tp: int, ep: int,
                      etp: int, trainable: bool = True, local_index: int | None = None,
                      name: str | None = None) -> list[ParamTensor]:
    """Parameters of decoder layer ``layer`` (global index: dense or MoE) on one rank;
    megatron names it by its position in the chunk, ``local_index`` (default ``layer``).
    ``prefix`` ends with a dot. ``name``: the layer's whole name prefix instead (an MTP layer's
    ``mtp.layers.i.transformer_layer.``)."""
    h = llm.hidden_size
    nt = _split(llm.num_attention_heads, tp, "num_attention_heads")
    p = name or f"{prefix}decoder.layers.{layer if local_index is None else local_index}."
    # megatron marks routed-expert weights allreduce=False only under expert parallelism
    # (moe/experts.py); at ep=1 they share the dense buffers and DP group.
    expert_parallel = ep > 1

    def t(name: str, shape: tuple[int, ...], dt: str = dtype, expert: bool = False):
        return ParamTensor(p + name, shape, dt, expert, trainable)

    out = [t("input_layernorm.weight", (h,), "fp32")]
    if llm.attention == "gqa":
        out += _gqa_tensors(llm, t, tp)
    else:
        out += _mla_tensors(llm, t, nt)
    out.append(t("pre_mlp_layernorm.weight", (h,), "fp32"))
    if llm.sandwich_norms:  # models/sandwich.py (GLM-4.1V)
        out += [t("post_self_attn_layernorm.weight", (h,), "fp32"),
                t("post_mlp_layernorm.weight", (h,), "fp32")]
    if not llm.moe_layer_freq[layer]:
        f = _split(llm.ffn_hidden_size, tp, "ffn_hidden_size")
        return out + _mlp_tensors(llm, t, "mlp.", f)
    local = _split(llm.num_experts, ep, "num_experts")
    fe = _split(llm.moe_ffn_hidden_size, etp, "moe_ffn_hidden_size")
    out.append(t("mlp.router.weight", (llm.num_experts, h)))
    if llm.add_bias_linear:
        out.append(t("mlp.router.bias", (llm.num_experts,)))
    for e in range(local):
        out += _mlp_tensors(llm, t, f"mlp.experts.local_experts.{e}.", fe, expert_parallel)
    if llm.num_shared_experts:
        fs = _split(llm.moe_ffn_hidden_size * llm.num_shared_experts, tp, "shared expert FFN")
        out += _mlp_tensors(llm, t, "mlp.shared_experts.", fs)
    return out


def _mlp_tensors(llm: LLMConfig, t, q: str, f: int, expert: bool = False) -> list[ParamTensor]:
    """A gated MLP's ``linear_fc1 [2 f, h]`` and ``linear_fc2 [h, f]`` (``f`` this rank's
    width), each followed by its bias with ``add_bias_linear`` (fc2's whole: row-parallel)."""
    h = llm.hidden_size
    out = [t(q + "linear_fc1.weight", (2 * f, h), expert=expert)]
    if llm.add_bias_linear:
        out.append(t(q + "linear_fc1.bias", (2 * f,), expert=expert))
    out.append(t(q + "linear_fc2.weight", (h, f), expert=expert))
    if llm.add_bias_linear:
        out.append(t(q + "linear_fc2.bias", (h,), expert=expert))
    return out


def _gqa_tensors(llm: LLMConfig, t, tp: int) -> list[ParamTensor]:
    """megatron's ``SelfAttention`` (local spec): ``linear_proj`` row-parallel, the fused
    ``linear_qkv`` column-parallel (``(heads + 2 groups) x head_dim`` rows, interleaved per query
    group, so TP splits whole groups), its optional bias, and the per-head q/k RMSNorms
    (``[head_dim]``, whole on every rank, fp32)."""
    h, d = llm.hidden_size, llm.head_dim
    nt = _split(llm.num_attention_heads, tp, "num_attention_heads")
    gt = _split(llm.query_groups, tp, "num_query_groups")
    out = []
    if llm.attention_sinks:  # models/attention.py: one learned logit per local head
        out.append(t("self_attention.core_attention.softmax_offset", (nt,)))
    out.append(t("self_attention.linear_proj.weight", (h, nt * d)))
    if llm.add_bias_linear:  # row-parallel: the whole bias on every rank
        out.append(t("self_attention.linear_proj.bias", (h,)))
    out.append(t("self_attention.linear_qkv.weight", ((nt + 2 * gt) * d, h)))
    if llm.add_qkv_bias or llm.add_bias_linear:
        out.append(t("self_attention.linear_qkv.bias", ((nt + 2 * gt) * d,)))
    if llm.qk_layernorm:
        out += [t("self_attention.q_layernorm.weight", (d,), "fp32"),
                t("self_attention.k_layernorm.weight", (d,), "fp32")]
    return out


def _mla_tensors(llm: LLMConfig, t, nt: int) -> list[ParamTensor]:
    """megatron's ``MLASelfAttention`` (see the module docstring for what TP splits)."""
    h, d_qk, d_v = llm.hidden_size, llm.qk_head_dim, llm.v_head_dim
    out = [t("self_attention.linear_proj.weight", (h, nt * d_v))]
    if llm.q_lora_rank is None:
        out.append(t("self_attention.linear_q_proj.weight", (nt * d_qk, h)))
    else:
        out += [t("self_attention.linear_q_down_proj.weight", (llm.q_lora_rank, h)),
                t("self_attention.linear_q_up_proj.weight", (nt * d_qk, llm.q_lora_rank))]
    out += [
        t("self_attention.linear_kv_down_proj.weight",
          (llm.kv_lora_rank + llm.qk_rope_head_dim, h)),
        t("self_attention.linear_kv_up_proj.weight",
          (nt * (llm.qk_nope_head_dim + d_v), llm.kv_lora_rank)),
    ]
    if llm.q_lora_rank is not None:
        out.append(t("self_attention.q_layernorm.weight", (llm.q_lora_rank,), "fp32"))
    out.append(t("self_attention.kv_layernorm.weight", (llm.kv_lora_rank,), "fp32"))
    return out


def vision_parallel_mode(vision: VisionConfig) -> str:
    """``tp`` (megatron TP inside the ViT) or ``split`` (the ViT replicated over TP, media split
    over TP x CP ranks); configs from before ``model.vision.parallel_mode`` existed were ``tp``."""
    return getattr(vision, "parallel_mode", "tp")


def vit_encoder_tensors(v, num_layers: int, h: int, ht: int, f: int) -> list[ParamTensor]:
    """The pre-LN ViT encoder with biases that MoonViT and SigLIP towers share (megatron's local
    layer names): ``num_layers`` layers of width ``h`` (``ht`` = h / vision TP, ``f`` = MLP width
    / vision TP) and the final LayerNorm; ``v(name, shape, dtype=...)`` makes one tensor."""
    out = []
    for i in range(num_layers):
        q = f"encoder.layers.{i}."
        out += [v(q + "input_layernorm.weight", (h,), "fp32"),
                v(q + "input_layernorm.bias", (h,), "fp32"),
                v(q + "self_attention.linear_proj.weight", (h, ht)),
                v(q + "self_attention.linear_proj.bias", (h,)),
                v(q + "self_attention.linear_qkv.weight", (3 * ht, h)),
                v(q + "self_attention.linear_qkv.bias", (3 * ht,)),
                v(q + "pre_mlp_layernorm.weight", (h,), "fp32"),
                v(q + "pre_mlp_layernorm.bias", (h,), "fp32"),
                v(q + "mlp.linear_fc1.weight", (f, h)), v(q + "mlp.linear_fc1.bias", (f,)),
                v(q + "mlp.linear_fc2.weight", (h, f)), v(q + "mlp.linear_fc2.bias", (h,))]
    return out + [v("encoder.final_layernorm.weight", (h,), "fp32"),
                  v("encoder.final_layernorm.bias", (h,), "fp32")]


def vision_tensors(vision: VisionConfig, projector: ProjectorConfig, dtype: str, tp: int,
                   train_vision: bool = True, train_projector: bool = True,
                   vision_tp: int | None = None) -> list[ParamTensor]:
    """MoonViT (``vision_tower.``) and projector (``projector.``) parameters on one TP rank;
    the ViT's own linears are split over ``vision_tp`` (default ``tp``; 1 in split mode), the
    projector always over ``tp``."""
    h, c, ps = vision.hidden_size, vision.in_channels, vision.patch_size
    vtp = tp if vision_tp is None else vision_tp
    f = _split(vision.ffn_hidden_size, vtp, "vision ffn_hidden_size")
    ht = _split(h, vtp, "vision hidden_size")

    def v(name: str, shape: tuple[int, ...], dt: str = dtype):
        return ParamTensor("vision_tower." + name, shape, dt, False, train_vision)

    out = [v("patch_embed.weight", (h, c, ps, ps)), v("patch_embed.bias", (h,)),
           v("pos_embed.weight", (vision.pos_emb_height, vision.pos_emb_width, h))]
    out += vit_encoder_tensors(v, vision.num_layers, h, ht, f)
    inter = _split(projector.intermediate_size, tp, "projector intermediate size")

    def pj(name: str, shape: tuple[int, ...]):
        return ParamTensor("projector." + name, shape, dtype, False, train_projector)

    return out + [pj("pre_norm.weight", (projector.vision_hidden_size,)),
                  pj("pre_norm.bias", (projector.vision_hidden_size,)),
                  pj("mlp.linear_fc1.weight", (inter, projector.input_size)),
                  pj("mlp.linear_fc1.bias", (inter,)),
                  pj("mlp.linear_fc2.weight", (projector.output_size, inter)),
                  pj("mlp.linear_fc2.bias", (projector.output_size,))]


def mtp_tensors(llm: LLMConfig, prefix: str, dtype: str, tp: int, ep: int, etp: int,
                trainable: bool = True) -> list[ParamTensor]:
    """The MTP layers on the last stage (megatron's ``mtp.layers.i``: ``enorm``, ``hnorm``,
    the column-parallel ``eh_proj`` ``2h -> h``, one decoder layer of the last layer's kind,
    ``final_layernorm``); they share the embedding and output head."""
    h, out = llm.hidden_size, []
    for i in range(llm.mtp_num_layers):
        p = f"{prefix}mtp.layers.{i}."
        out += [ParamTensor(p + "enorm.weight", (h,), "fp32", False, trainable),
                ParamTensor(p + "hnorm.weight", (h,), "fp32", False, trainable),
                ParamTensor(p + "eh_proj.weight", (_split(h, tp, "hidden_size"), 2 * h), dtype,
                            False, trainable)]
        out += llm_layer_tensors(llm, llm.num_layers - 1, prefix, dtype, tp, ep, etp, trainable,
                                 name=p + "transformer_layer.")
        out.append(ParamTensor(p + "final_layernorm.weight", (h,), "fp32", False, trainable))
    return out


def chunk_tensors(model: ModelConfig, layers: Sequence[int], *, first: bool, last: bool,
                  tp: int = 1, ep: int = 1, etp: int | None = None
                  ) -> list[ParamTensor]:
    """Parameters of one model chunk holding decoder ``layers``; ``first`` = it embeds tokens
    (and runs the ViT + projector of a VLM), ``last`` = it holds the final norm and head."""
    llm, dtype = model.llm, model.params_dtype
    etp = tp if etp is None else etp
    prefix = "language_model." if model.is_vlm else ""
    train_llm = not model.freeze_llm
    vocab = padded_vocab(llm.vocab_size, tp) // tp
    out: list[ParamTensor] = []
    if first:
        out.append(ParamTensor(prefix + "embedding.word_embeddings.weight",
                               (vocab, llm.hidden_size), dtype, False, train_llm))
    for local, i in enumerate(layers):
        out += llm_layer_tensors(llm, i, prefix, dtype, tp, ep, etp, train_llm, local)
    if last:
        out.append(ParamTensor(prefix + "decoder.final_layernorm.weight", (llm.hidden_size,),
                               "fp32", False, train_llm))
        out += mtp_tensors(llm, prefix, dtype, tp, ep, etp, train_llm)
        if llm.untie_embeddings or not first:
            out.append(ParamTensor(prefix + "output_layer.weight", (vocab, llm.hidden_size),
                                   dtype, False, train_llm))
    if first and model.is_vlm:
        out += family_costs(model.family).vision_tensors(
            model.vision, model.projector, dtype, tp, not model.freeze_vision,
            not model.freeze_projector,
            vision_tp=tp if vision_parallel_mode(model.vision) == "tp" else 1)
    return out
