"""GPT-OSS LLM (InternVL3.5-20B-A4B's text model) from megatron-core modules == transformers'
``GptOssForCausalLM``.

Tiny fp32 model: hidden 64, 4 layers alternating sliding (layer 0) / full attention with a
6-token window (documents of 17 and 11 tokens: longer than the window), GQA 4 query / 2
key-value heads of dim 16 with q/k/v/o biases and learned per-head sinks, every layer MoE (8
biased experts of width 32, top 2 of a biased router's logits then softmax), the clamped SwiGLU
with the +1 (limit 1.5 here, so that the clamps bite at these scales), YaRN (factor 4 from 64
positions, correction range not truncated). megatron-core's own options
(``softmax_type='learnable'``, ``window_size``, ``window_attn_skip_freq``, ``quick_gelu`` +
``glu_linear_offset`` + ``activation_func_clamp_value``, ``add_bias_linear``, GPTModel's
``yarn``) with our packed THD attention kernels (``sdpa_mask``, ``sdpa_doc``, ``flex``: the
CPU ones). Weights through ``families/internvl/hf_llm_names.py``'s GPT-OSS rules and its
fused-expert aliases. Documents with padding in their spans against HF on each document alone.
Measured max |ours - HF|: see :data:`MEASURED`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
from internvl_llm_reference import build_ours, packed_params, perturb, tokens

ATOL = 1e-5
VOCAB, THETA, WINDOW, LIMIT = 128, 1e4, 6, 1.5
YARN = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
            num_experts_per_tok=2, sliding_window=WINDOW, swiglu_limit=LIMIT,
            rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
            attention_bias=True, rope_parameters=YARN)
MEASURED = "packed: 4.9e-6 sdpa_mask, 4.2e-6 sdpa_doc, 5.7e-6 flex (logits up to ~5.6)"


def hf_gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(**TEXT)
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).eval()
    perturb(model, seed + 1, std=0.2, bias_std=0.5)
    return model


def our_llm(**overrides):
    from megatron_vlm.config.model import LLMConfig, YarnConfig

    kwargs = dict(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, add_qkv_bias=True, add_bias_linear=True,
        attention_sinks=True, sliding_window=WINDOW, window_attn_skip_freq=2,
        mlp_activation="clamped_swiglu", swiglu_limit=LIMIT, ffn_hidden_size=32,
        num_dense_layers=0, num_experts=8, moe_router_topk=2, num_shared_experts=0,
        moe_ffn_hidden_size=32, moe_router_score_function="softmax",
        moe_router_pre_softmax=False, moe_router_topk_scaling_factor=1.0,
        moe_router_enable_expert_bias=False, rope_theta=THETA,
        # HF's default attention factor 0.1 ln s + 1 = megatron's mscale(s, 1) / mscale(s, 0)
        yarn=YarnConfig(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0, truncate=False),
        norm_epsilon=1e-5, untie_embeddings=True, max_position_embeddings=256)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def hf_state(hf_model) -> dict[str, torch.Tensor]:
    """LLM-relative HF names (``lm_head`` top-level), the fused experts split by the family's
    import aliases (:data:`GPT_OSS_EXPERT_LAYOUTS`)."""
    from megatron_vlm.families.internvl.hf_llm_names import GPT_OSS_EXPERT_LAYOUTS

    out = {}
    for key, value in hf_model.state_dict().items():
        name = key.removeprefix("model.")
        if "rotary_emb" in name:
            continue
        for alias in GPT_OSS_EXPERT_LAYOUTS:
            binding = alias.match(name)
            if binding is not None:
                for e in range(value.shape[0]):
                    dst = alias.dst[0].replace("{pre}", binding["pre"]).replace("{E}", str(e))
                    out[dst] = alias.fn([value], None, e)[0]
                break
        else:
            out[name] = value
    return out


def build(llm=None, hf=None, kernels=None):
    from megatron_vlm.families.internvl.hf_llm_names import gpt_oss_llm_rules, internvl_head_rules

    hf = hf or hf_gpt_oss()
    llm = llm or our_llm()
    return hf, build_ours(llm, hf_state(hf), gpt_oss_llm_rules() + internvl_head_rules(), kernels)


@pytest.fixture(scope="module")
def models(megatron_groups):
    return build()


LENGTHS, SPANS = [17, 11], [18, 13]


def _packed_logits(ours, ids):
    positions = torch.cat([torch.arange(n) for n in SPANS])[None]
    with torch.no_grad():
        return ours(ids, positions, None, packed_seq_params=packed_params(LENGTHS, SPANS))


def _check_per_document(hf, got, ids) -> None:
    with torch.no_grad():
        for start, n in zip([0, SPANS[0]], LENGTHS):
            expected = hf(input_ids=ids[:, start:start + n]).logits
            assert expected.abs().max() > 1.0
            torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)


def test_single_sequence_logits_equal_transformers(models):
    """sbhd (no packing): 20 tokens, windows of 6 in layers 0 and 2."""
    hf, ours = models
    ids = tokens(20, seed=1, vocab=VOCAB)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(20)[None], None)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa_mask", "sdpa_doc", "flex"])
def test_packed_documents_equal_transformers_per_document(models, kernel):
    from megatron_vlm.config.model import KernelConfig

    hf, ours = models
    if kernel != "sdpa_mask":
        _, ours = build(hf=hf, kernels=KernelConfig(attention_kernel=kernel))
    ids = tokens(sum(SPANS), seed=2, vocab=VOCAB)
    _check_per_document(hf, _packed_logits(ours, ids), ids)


@pytest.mark.parametrize("change", ["no_sinks", "no_window", "window_everywhere", "limit_7",
                                    "no_yarn_truncate"])
def test_each_gpt_oss_option_reaches_the_logits(models, change):
    """Controls: the same weights with one option changed differ from HF (so each is tested)."""
    hf, ours = models
    llm = our_llm()
    if change == "no_sinks":
        with torch.no_grad():
            other = build(hf=hf)[1]
            for layer in other.decoder.layers:
                layer.self_attention.core_attention.softmax_offset.fill_(-1e4)
    else:
        edits = {"no_window": dict(sliding_window=None, window_attn_skip_freq=None),
                 "window_everywhere": dict(window_attn_skip_freq=None),
                 "limit_7": dict(swiglu_limit=7.0),
                 "no_yarn_truncate": dict(yarn=dataclasses.replace(llm.yarn, truncate=True))}
        other = build(llm=our_llm(**edits[change]), hf=hf)[1]
    ids = tokens(sum(SPANS), seed=2, vocab=VOCAB)
    got = _packed_logits(other, ids)
    with torch.no_grad():
        expected = hf(input_ids=ids[:, :LENGTHS[0]]).logits
    assert (got[:, :LENGTHS[0]] - expected).abs().max() > 100 * ATOL


def test_gpt_oss_transformer_config_fields():
    """GPT-OSS-20B sizes map onto megatron's own options, field by field."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer.utils import is_layer_window_attention

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.model import YarnConfig
    from megatron_vlm.models.llm import build_transformer_config

    llm = our_llm(vocab_size=201088, hidden_size=2880, num_layers=24, num_attention_heads=64,
                  num_query_groups=8, kv_channels=64, num_experts=32, moe_router_topk=4,
                  moe_ffn_hidden_size=2880, ffn_hidden_size=2880, sliding_window=128,
                  swiglu_limit=7.0, rope_theta=150000.0,
                  yarn=YarnConfig(factor=32.0, original_max_position_embeddings=4096,
                                  mscale=1.0, mscale_all_dim=0.0, truncate=False))
    c = build_transformer_config(llm, ParallelConfig(), "bf16")
    assert c.softmax_type == "learnable" and c.window_size == (127, 0)
    assert c.window_attn_skip_freq == 2
    slides = [is_layer_window_attention(c.window_size, c.window_attn_skip_freq, n + 1)
              for n in range(24)]
    assert slides == [i % 2 == 0 for i in range(24)] == [llm.layer_slides(i) for i in range(24)]
    assert c.activation_func is quick_gelu and c.gated_linear_unit
    assert c.glu_linear_offset == 1.0 and c.activation_func_clamp_value == 7.0
    assert c.add_bias_linear and c.add_qkv_bias and c.num_moe_experts == 32
    assert c.moe_router_score_function == "softmax" and not c.moe_router_pre_softmax
    assert c.moe_shared_expert_intermediate_size is None
    assert not c.moe_router_enable_expert_bias
    assert (c.yarn_rotary_scaling_factor, c.yarn_original_max_position_embeddings) == (32, 4096)
    assert not c.yarn_correction_range_round_to_int


def test_gpt_oss_options_are_checked():
    from megatron_vlm.config.model import LLMConfig, YarnConfig

    with pytest.raises(ValueError, match="attention_sinks applies to attention=gqa"):
        LLMConfig(attention_sinks=True)
    with pytest.raises(ValueError, match="add_bias_linear applies to attention=gqa"):
        LLMConfig(add_bias_linear=True)
    with pytest.raises(ValueError, match="window_attn_skip_freq needs sliding_window"):
        our_llm(sliding_window=None)
    with pytest.raises(ValueError, match="yarn.truncate=false applies to attention=gqa"):
        LLMConfig(yarn=YarnConfig(factor=4.0, truncate=False))


def test_varlen_refuses_sinks_and_auto_skips_it():
    from megatron_vlm.config.model import KernelConfig
    from megatron_vlm.models.specs import Capabilities, choose_kernels

    caps = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                        grouped_gemm=False)
    llm = our_llm()
    with pytest.raises(ValueError, match="varlen has no attention sinks"):
        choose_kernels(KernelConfig(backend="local", attention_kernel="varlen"), caps,
                       params_dtype="bf16", llm=llm)
    choice = choose_kernels(KernelConfig(backend="local"), caps, params_dtype="bf16", llm=llm)
    assert choice.attention_kernel == "flex"


def test_param_count_closed_form_equals_built_model(models):
    """Sinks, q/k/v/o biases, router and expert biases are in the closed-form count."""
    from megatron_vlm.models.param_count import count_llm_params_closed_form, count_module_params

    _, ours = models
    built = count_module_params(ours)
    closed = count_llm_params_closed_form(our_llm())
    assert {k: closed[k] for k in built} == built
    assert built["attention"] == 4 * (64 * 128 + 128 + 64 * 64 + 64 + 4)


def test_flops_count_the_sliding_band_only():
    """Causal sliding layers compute ``(s^2 - (s-w)^2) / 2`` scores, full layers ``s^2 / 2``:
    at s = 4w the band is 7/16 of the triangle; half the layers slide here."""
    from megatron_vlm.training.flops import llm_flops_breakdown_per_token

    s = 4 * WINDOW
    full = llm_flops_breakdown_per_token(our_llm(sliding_window=None, window_attn_skip_freq=None),
                                         s)["attn_core"]
    swa = llm_flops_breakdown_per_token(our_llm(), s)["attn_core"]
    assert swa == pytest.approx(full * (2 + 2 * 7 / 16) / 4)
    every = llm_flops_breakdown_per_token(our_llm(window_attn_skip_freq=None), s)["attn_core"]
    assert every == pytest.approx(full * 7 / 16)
    longer = llm_flops_breakdown_per_token(our_llm(), WINDOW)["attn_core"]  # window >= s: full
    assert longer == llm_flops_breakdown_per_token(
        our_llm(sliding_window=None, window_attn_skip_freq=None), WINDOW)["attn_core"]


def test_planned_tensors_equal_the_built_model(megatron_groups):
    """The planner's tensor list has the sinks and every bias, in megatron's module order."""
    from internvl_llm_reference import planned_and_built_tensors

    planned, built = planned_and_built_tensors(our_llm())
    assert planned == built
    assert ("decoder.layers.0.self_attention.core_attention.softmax_offset", (4,), "bf16") in built


def test_every_parameter_trains_and_checkpoints(megatron_groups):
    """One packed backward reaches every parameter (sinks, router and expert biases included);
    the sinks are a TP-sharded tensor of megatron's distributed checkpoint (axis 0 = heads)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    _, ours = build()
    ours.train()
    ids = tokens(sum(SPANS), seed=4, vocab=VOCAB)
    positions = torch.cat([torch.arange(n) for n in SPANS])[None]
    logits = ours(ids, positions, None, packed_seq_params=packed_params(LENGTHS, SPANS))
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    reached = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    # an expert no token was routed to has none; every other parameter must
    assert {n for n in grads if ".local_experts." not in n} <= reached
    for layer in range(4):
        for p in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"):
            assert any(n.startswith(f"decoder.layers.{layer}.") and n.endswith(p)
                       and ".local_experts." in n for n in reached), (layer, p)
    sharded = ours.sharded_state_dict()
    sinks = sharded["decoder.layers.0.self_attention.core_attention.softmax_offset"]
    assert isinstance(sinks, ShardedTensor) and sinks.global_shape == (4,)


def test_gradients_equal_transformers(megatron_groups):
    """Backward through the sinks, the sliding window, the biased router and experts: the
    gradients of the sinks, o_proj / router / expert biases and the embedding equal HF's for
    the same loss on a packed document and that document alone (measured: 8e-5 on embedding
    gradients of magnitude 19, fp32 summation order)."""
    hf, ours = build()
    hf.train()
    ours.train()
    ids = tokens(sum(SPANS), seed=5, vocab=VOCAB)
    positions = torch.cat([torch.arange(n) for n in SPANS])[None]
    got = ours(ids, positions, None, packed_seq_params=packed_params(LENGTHS, SPANS))
    got[:, :LENGTHS[0]].logsumexp(-1).sum().backward()
    hf(input_ids=ids[:, :LENGTHS[0]]).logits.logsumexp(-1).sum().backward()
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    pairs = [("model.embed_tokens.weight", "embedding.word_embeddings.weight", None)]
    for i in range(4):
        h, o = f"model.layers.{i}.", f"decoder.layers.{i}."
        pairs += [(h + "self_attn.sinks", o + "self_attention.core_attention.softmax_offset", None),
                  (h + "self_attn.o_proj.bias", o + "self_attention.linear_proj.bias", None),
                  (h + "mlp.router.bias", o + "mlp.router.bias", None)]
        pairs += [(h + "mlp.experts.down_proj_bias",
                   o + f"mlp.experts.local_experts.{e}.linear_fc2.bias", e) for e in range(8)]
    for hname, oname, e in pairs:
        want = hp[hname].grad if e is None else hp[hname].grad[e]
        have = op[oname].grad
        have = torch.zeros_like(want) if have is None else have[: want.shape[0]]
        assert want.abs().sum() > 0 or e is not None, hname
        # fp32 sums of up to ~20 (embedding rows): 1e-5 of the tensor's largest entry
        err = float((have - want).abs().max())
        assert err <= 1e-5 * max(1.0, float(want.abs().max())), (oname, err)


def test_config_both_ways():
    """transformers' ``GptOssConfig`` -> our LLMConfig is the one written by hand above, and
    back to a config transformers builds the same model from; unsupported fields are refused."""
    from transformers import GptOssConfig

    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.internvl.hf_llm_config import llm_from_hf, llm_to_hf

    config = GptOssConfig(**TEXT)
    hf = config.to_dict()
    llm = llm_from_hf(hf)
    assert llm == our_llm()
    exported = llm_to_hf(llm, "gpt_oss")
    again = GptOssConfig(**{k: v for k, v in exported.items() if k != "model_type"})
    for key in ("layer_types", "sliding_window", "swiglu_limit", "num_local_experts",
                "num_experts_per_tok", "intermediate_size", "head_dim", "rope_parameters"):
        assert getattr(again, key) == getattr(config, key), key
    assert llm_from_hf(again.to_dict()) == llm
    with pytest.raises(ConversionError, match="layer_types"):
        llm_from_hf({**hf, "layer_types": ["full_attention", "sliding_attention"] * 2})
    with pytest.raises(ConversionError, match="swiglu_alpha"):
        llm_from_hf({**hf, "swiglu_alpha": 1.0})


def test_gpt_oss_20b_count_equals_transformers():
    """The released GPT-OSS-20B sizes (transformers' ``GptOssConfig`` defaults but 24 layers and
    32 experts): the config mapping's LLM has transformers' parameter count, 20.9 B, in the
    closed form and in the planner's tensor list (padded vocabulary: 201088 is a multiple of
    128)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from megatron_vlm.config.model import ModelConfig
    from megatron_vlm.families.internvl.hf_llm_config import llm_from_hf
    from megatron_vlm.models.param_count import count_llm_params_closed_form
    from megatron_vlm.planning.tensors import chunk_tensors

    config = GptOssConfig(num_hidden_layers=24, num_local_experts=32)
    with torch.device("meta"):
        expected = GptOssForCausalLM(config).num_parameters()
    llm = llm_from_hf(config.to_dict())
    assert llm.window_attn_skip_freq == 2 and llm.sliding_window == 128
    assert count_llm_params_closed_form(llm)["total"] == expected == 20_914_757_184
    planned = chunk_tensors(ModelConfig(llm=llm, params_dtype="bf16"), range(24), first=True,
                            last=True)
    assert sum(t.numel for t in planned) == expected
