"""The GLM LLMs from megatron-core modules == transformers' GLM-4.5V / GLM-4.1V, text only.

* GLM-4.5V (``Glm4vMoeForConditionalGeneration``): GQA (4 query / 2 key-value heads of dim 32,
  so the q projection, 128 wide, is not hidden-square) with q/k/v biases, partial rotary 0.5
  (16 of 32 channels), NeoX M-RoPE sections [2, 3, 3] over the 8 rotated frequencies (GLM's
  [8, 12, 12] scaled to the tiny head), a dense first layer, then sigmoid-routed MoE (8 experts,
  top 2, normalised, routed scaling 1.5, a random fp32 expert bias that changes the choice) with
  one shared expert.
* GLM-4.1V (``Glm4vForConditionalGeneration``): dense, the same attention (head dim = hidden /
  heads = 32), interleaved-pair M-RoPE, and the sandwich norms (post-attention and post-MLP).

Both are fed the same 3-axis position ids (t, h, w differ: a 2x3 image block inside text) as
``[3, 1, L]``; weights go through the family's name rules (``families/glm/hf_llm_names.py``)
from the HF state dict (experts split into the release's per-expert names). Tiny fp32 models,
every weight perturbed so that a wrong mapping shows. Measured max |ours - HF| on logits of
magnitude ~3-6: see each test's docstring.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB, THETA, SECTION = 128, 1e4, [2, 3, 3]
ROPE = {"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5,
        "mrope_section": SECTION}
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, patch_size=14,
              image_size=28, spatial_merge_size=2, temporal_patch_size=2)
GLM45_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, routed_scaling_factor=1.5, first_k_dense_replace=1,
                  n_group=1, topk_group=1, norm_topk_prob=True, attention_bias=True,
                  rms_norm_eps=1e-5, max_position_embeddings=256, rope_parameters=ROPE)
GLM41_TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=256, rope_parameters=ROPE)

# 3 text tokens, a 2x3 image block (start 3: t = 3, h = 3 + row, w = 3 + col), 2 text tokens.
DOC_A = torch.tensor([
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
    [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
    [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
])
# A 3x2 block first, then 3 text tokens.
DOC_B = torch.tensor([
    [0, 0, 0, 0, 0, 0, 3, 4, 5],
    [0, 0, 1, 1, 2, 2, 3, 4, 5],
    [0, 1, 0, 1, 0, 1, 3, 4, 5],
])


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            else:  # std ~0.2: sharp attention, so position errors reach the logits
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def hf_glm45v(seed: int = 0):
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    torch.manual_seed(seed)
    config = Glm4vMoeConfig(text_config=GLM45_TEXT, vision_config=dict(VISION, out_hidden_size=64))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Glm4vMoeForConditionalGeneration(config).eval()
    _perturb(model, seed + 1)
    return model


def hf_glm41v(seed: int = 0):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(seed)
    config = Glm4vConfig(text_config=GLM41_TEXT, vision_config=dict(VISION, out_hidden_size=128))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Glm4vForConditionalGeneration(config).eval()
    _perturb(model, seed + 1, std=0.15)  # hidden 128: smaller weights keep logits ~5
    return model


def glm45v_llm(**overrides):
    """Our ``LLMConfig`` of :data:`GLM45_TEXT`."""
    from megatron_vlm.config.model import LLMConfig

    kwargs = dict(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=3, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=1, num_experts=8, moe_router_topk=2, num_shared_experts=1,
        moe_ffn_hidden_size=32, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=1.5, moe_router_enable_expert_bias=True,
        rope_theta=THETA, position_embedding="mrope", mrope_section=SECTION, mrope_style="neox",
        rotary_fraction=0.5, norm_epsilon=1e-5, untie_embeddings=True,
        max_position_embeddings=256)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def glm41v_llm(**overrides):
    """Our ``LLMConfig`` of :data:`GLM41_TEXT`."""
    from megatron_vlm.config.model import LLMConfig

    kwargs = dict(
        attention="gqa", vocab_size=VOCAB, hidden_size=128, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=2, num_experts=None, rope_theta=THETA, position_embedding="mrope",
        mrope_section=SECTION, mrope_style="interleaved", rotary_fraction=0.5,
        sandwich_norms=True, norm_epsilon=1e-5, untie_embeddings=True,
        max_position_embeddings=256)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def release_state(hf_model, prefix: str = "model.language_model.") -> dict[str, torch.Tensor]:
    """The HF LLM's tensors under LLM-relative names (``lm_head`` top-level), transformers'
    fused in-memory experts split into the release's per-expert ``gate/up/down_proj``."""
    out = {}
    for key, value in hf_model.state_dict().items():
        if key == "lm_head.weight":
            out[key] = value
        if not key.startswith(prefix) or "rotary_emb" in key:
            continue
        name = key[len(prefix):]
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[:-len("gate_up_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = t.chunk(2)
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[:-len("down_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.down_proj.weight"] = t
        else:
            out[name] = value
    return out


def build_ours(llm, hf_model, *, moe: bool, sandwich: bool, fused_gate_up: bool,
               extra: dict[str, torch.Tensor] | None = None,
               hf_prefix: str = "model.language_model."):
    """Our LLM (eval) with ``hf_model``'s weights through the GLM name rules: every tensor of
    our state dict is produced by exactly one rule, and every HF tensor is used. ``extra``:
    HF-named tensors absent from transformers' model (the MTP layer)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.families.glm.hf_llm_names import glm_head_rules, glm_llm_rules
    from megatron_vlm.models.llm import build_llm, padded_vocab_size

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(llm, ParallelConfig()).eval()
    ctx = ConvertContext(num_heads=llm.num_attention_heads, num_query_groups=llm.query_groups,
                         vocab_size=llm.vocab_size,
                         padded_vocab_size=padded_vocab_size(llm.vocab_size, 1),
                         num_dense_layers=llm.num_dense_layers)
    rules = glm_llm_rules(moe=moe, sandwich=sandwich, fused_gate_up=fused_gate_up,
                          num_layers=llm.num_layers, mtp_num_layers=llm.mtp_num_layers)
    table = Table(rules + glm_head_rules(), ctx)
    hf_state = {**release_state(hf_model, hf_prefix), **(extra or {})}
    used, state = set(), {}
    for name, ours in model.state_dict().items():
        if name.endswith("._extra_state"):  # megatron's (empty) per-module extra state
            continue
        rule, binding = table.lookup(name)
        names = rule.hf_names(binding)
        used.update(names)
        state[name] = rule.transform.to_ours([hf_state[n] for n in names], ctx)
        assert state[name].shape == ours.shape, name
    assert used == set(hf_state), sorted(set(hf_state) - used)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), missing
    return model


def hf_logits(hf, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF logits of one document with 3-axis ``positions [3, L]`` (or 1D ``[L]``)."""
    pos = positions[:, None, :] if positions.dim() == 2 else positions[None, None].expand(3, 1, -1)
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def glm45(megatron_groups):
    hf = hf_glm45v()
    return hf, build_ours(glm45v_llm(), hf, moe=True, sandwich=False, fused_gate_up=False)


@pytest.fixture(scope="module")
def glm41(megatron_groups):
    hf = hf_glm41v()
    return hf, build_ours(glm41v_llm(), hf, moe=False, sandwich=True, fused_gate_up=True)


def test_glm45v_text_logits_equal_transformers(glm45):
    """GLM-4.5V LLM, one sequence (sbhd) with 3-axis ids. Measured max diff 1.9e-6."""
    hf, ours = glm45
    ids = _tokens(DOC_A.shape[1], seed=1)
    expected = hf_logits(hf, ids, DOC_A)
    with torch.no_grad():
        got = ours(ids, DOC_A, None)
    assert got.shape == expected.shape == (1, DOC_A.shape[1], VOCAB)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Control: the same tokens at 1D positions (t only) give other logits.
    assert (hf_logits(hf, ids, DOC_A[0]) - expected).abs().max() > 1e3 * ATOL


@pytest.mark.parametrize("which", ["glm45", "glm41"])
def test_packed_documents_equal_transformers_per_document(request, which):
    """Two documents in one THD sequence (11 tokens in a span of 12, 9 in 10), ``[3, S]`` ids:
    each document's logits equal HF's on that document alone (GLM-4.5V: MoE routing per token;
    GLM-4.1V: interleaved pairs through megatron's THD RoPE)."""
    from qwen3_reference import packed_params

    hf, ours = request.getfixturevalue(which)
    lengths, spans = [DOC_A.shape[1], DOC_B.shape[1]], [12, 10]
    ids = _tokens(sum(spans), seed=2)
    positions = torch.zeros(3, sum(spans), dtype=torch.long)
    positions[:, :lengths[0]] = DOC_A
    positions[:, spans[0]:spans[0] + lengths[1]] = DOC_B
    with torch.no_grad():
        got = ours(ids, positions, None, packed_seq_params=packed_params(lengths, spans))
    for start, doc in ((0, DOC_A), (spans[0], DOC_B)):
        n = doc.shape[1]
        expected = hf_logits(hf, ids[:, start:start + n], doc)
        torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)


def test_glm41v_text_logits_equal_transformers(glm41):
    """GLM-4.1V LLM (sandwich norms, interleaved M-RoPE), one sequence. Measured max diff
    1.4e-6; the post-attention norms left at 1 instead: see the control."""
    hf, ours = glm41
    ids = _tokens(DOC_A.shape[1], seed=3)
    expected = hf_logits(hf, ids, DOC_A)
    with torch.no_grad():
        got = ours(ids, DOC_A, None)
    assert got.shape == expected.shape and expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Control: the sandwich norms take part (their weights matter).
    norm = ours.decoder.layers[0].post_self_attn_layernorm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.fill_(1.0)
        changed = ours(ids, DOC_A, None)
        norm.copy_(saved)
    assert (changed - expected).abs().max() > 1e3 * ATOL


def _mtp_release_tensors(hf, num_layers: int, seed: int) -> dict[str, torch.Tensor]:
    """HF-named tensors of one MTP layer (HF layer ``num_layers``, Megatron-Bridge's GLM-4.5
    names): its decoder layer a copy of HF's last layer, random ``enorm``/``hnorm``/``eh_proj``
    /``shared_head.norm``."""
    last, mtp = f"layers.{num_layers - 1}.", f"layers.{num_layers}."
    out = {k.replace(last, mtp, 1): v.clone() for k, v in release_state(hf).items()
           if k.startswith(last)}
    gen = torch.Generator().manual_seed(seed)
    hidden = GLM45_TEXT["hidden_size"]
    for name in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{mtp}{name}.weight"] = torch.empty(hidden).uniform_(0.5, 1.5, generator=gen)
    out[f"{mtp}eh_proj.weight"] = 0.2 * torch.randn(hidden, 2 * hidden, generator=gen)
    return out


def _loss_and_grads(model, ids, positions, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, positions, None, labels=labels)  # [1, L] per-token losses
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_glm45v_mtp_layer_weight_zero_changes_nothing(glm45):
    """GLM-4.5-Air's MTP layer (megatron's ``mtp_num_layers=1``): every tensor maps to
    Megatron-Bridge's HF names (``build_ours`` checks both directions); logits without labels
    equal transformers' (the MTP layer skipped); with the default loss
    weight 0 the per-token LM loss equals cross-entropy of transformers' logits, the MTP layer
    gets exactly zero gradients and every other gradient equals the model without MTP; with
    weight 0.3 the MTP layer trains (non-zero gradients) and the main gradients change."""
    hf, plain = glm45
    extra = _mtp_release_tensors(hf, GLM45_TEXT["num_hidden_layers"], seed=7)
    ours = build_ours(glm45v_llm(mtp_num_layers=1), hf, moe=True, sandwich=False,
                      fused_gate_up=False, extra=extra)
    assert ours.config.mtp_loss_scaling_factor == 0.0
    ids, labels = _tokens(DOC_A.shape[1], seed=5), _tokens(DOC_A.shape[1], seed=6)
    logits = hf_logits(hf, ids, DOC_A)
    with torch.no_grad():  # without labels: the main model's logits (models/mtp.py)
        torch.testing.assert_close(ours(ids, DOC_A, None), logits, atol=ATOL, rtol=0)
    expected = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    loss, grads = _loss_and_grads(ours, ids, DOC_A, labels)
    torch.testing.assert_close(loss[0], expected, atol=ATOL, rtol=0)
    mtp = {n: g for n, g in grads.items() if n.startswith("mtp.")}
    assert {f"mtp.layers.0.{n}.weight" for n in ("enorm", "hnorm", "eh_proj")} < set(mtp)
    assert all(g is not None and not g.any() for g in mtp.values())
    _, plain_grads = _loss_and_grads(plain, ids, DOC_A, labels)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    ours.config.mtp_loss_scaling_factor = 0.3  # the config object every MTP module reads
    try:
        loss_w, grads_w = _loss_and_grads(ours, ids, DOC_A, labels)
    finally:
        ours.config.mtp_loss_scaling_factor = 0.0
    torch.testing.assert_close(loss_w, loss, atol=0, rtol=0)  # the MTP loss rides on gradients
    assert all(grads_w[n].abs().sum() > 0 for n in mtp if "expert" not in n)
    emb = "embedding.word_embeddings.weight"
    assert (grads_w[emb] - grads[emb]).abs().max() > 1e-4


def test_glm_llm_options_are_checked():
    from megatron_vlm.config.model import LLMConfig

    with pytest.raises(ValueError, match=r"summing to head_dim \* rotary_fraction / 2 = 32"):
        LLMConfig(attention="gqa", hidden_size=4096, num_attention_heads=96, kv_channels=128,
                  num_query_groups=8, rotary_fraction=0.5, position_embedding="mrope",
                  mrope_section=[16, 24, 24])
    LLMConfig(attention="gqa", hidden_size=4096, num_attention_heads=96, kv_channels=128,
              num_query_groups=8, rotary_fraction=0.5, position_embedding="mrope",
              mrope_section=[8, 12, 12])  # GLM-4.5V
    with pytest.raises(ValueError, match="rotary_fraction=0.3 must be in"):
        LLMConfig(attention="gqa", hidden_size=64, num_attention_heads=2, rotary_fraction=0.3)
    with pytest.raises(ValueError, match="rotary_fraction=0.5 applies to attention=gqa"):
        LLMConfig(rotary_fraction=0.5)
    with pytest.raises(ValueError, match="mrope_style=interleaved applies to"):
        LLMConfig(attention="gqa", mrope_style="interleaved")
    with pytest.raises(ValueError, match="mtp_num_layers=-1"):
        LLMConfig(mtp_num_layers=-1)


@pytest.mark.parametrize("which", ["glm45v_mtp", "glm41v"])
def test_parameter_count_closed_form_equals_built_model(megatron_groups, which):
    """``count_llm_params_closed_form`` (MTP layer, sandwich norms) == the parameters of the
    built model per group, and the meta-device build has the same names and shapes."""
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.models.param_count import (
        PARAM_GROUPS,
        build_llm_on_meta,
        count_llm_params_closed_form,
        count_module_params,
    )

    llm = glm45v_llm(mtp_num_layers=1) if which == "glm45v_mtp" else glm41v_llm()
    built = build_llm(llm, ParallelConfig())
    counted, closed = count_module_params(built), count_llm_params_closed_form(llm)
    assert {g: counted[g] for g in PARAM_GROUPS} == {g: closed[g] for g in PARAM_GROUPS}
    assert (closed["mtp"] > 0) == (which == "glm45v_mtp")
    meta = build_llm_on_meta(llm, ParallelConfig(), "fp32")
    assert ({n: p.shape for n, p in meta.named_parameters()}
            == {n: p.shape for n, p in built.named_parameters()})


def test_mtp_flops_by_hand():
    """Megatron-LM's MTP FLOPs (``training.py``: one more layer of the last layer's kind, its
    norms and ``eh_proj``, one more output layer), by hand for the tiny GLM-4.5V at 64 tokens."""
    from megatron_vlm.training.flops import llm_flops_per_token

    s, h, n, g, d, vocab = 64, 64, 4, 2, 32, VOCAB
    attention = h * n * d + h * 2 * g * d + n * d * h + 2 * s * n * d / 2  # causal core
    moe_mlp = 3 * h * 32 * (2 + 1)  # top-2 routed + 1 shared expert of 32
    extra = 6 * (attention + moe_mlp + 3 * h + 2 * h * h + h * vocab)
    delta = (llm_flops_per_token(glm45v_llm(mtp_num_layers=1), s)
             - llm_flops_per_token(glm45v_llm(), s))
    assert delta == pytest.approx(extra, rel=1e-12)


@pytest.mark.parametrize("which", ["glm45v_mtp", "glm41v"])
def test_planner_tensor_list_equals_built_model(megatron_groups, which):
    """The memory planner's parameter list (``planning/tensors.py``: sandwich norms, the MTP
    layer on the last stage) has the built model's names and shapes."""
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.model import ModelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.planning.tensors import chunk_tensors

    llm = glm45v_llm(mtp_num_layers=1) if which == "glm45v_mtp" else glm41v_llm()
    built = build_llm(llm, ParallelConfig())
    listed = chunk_tensors(ModelConfig(llm=llm), range(llm.num_layers), first=True, last=True)
    assert ({t.name: tuple(t.shape) for t in listed}
            == {n: tuple(p.shape) for n, p in built.named_parameters()})


class _FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_partial_interleaved_rope_under_context_parallel():
    """CP = 2 with GLM-4.1V's rotation (interleaved pairs over the first half of a 32-channel
    head): megatron's THD RoPE on each rank's share (``parallel/context.py``'s split) rotates
    every token by its own 3-axis angles and passes the unrotated half through, as the whole
    sequence does."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        _apply_rotary_pos_emb_thd,
    )
    from qwen3_reference import packed_params

    from megatron_vlm.models.mrope import mrope_freqs, rope_inv_freq, thd_freqs_for_megatron
    from megatron_vlm.parallel.context import context_parallel_layout

    spans, lengths = [12, 8], [11, 8]
    total = sum(spans)
    params = packed_params(lengths, spans)
    positions = torch.zeros(3, total, dtype=torch.long)
    positions[:, :11] = DOC_A
    positions[:, 12:20] = DOC_B[:, 1:] + 7
    inv = rope_inv_freq(16, THETA)
    whole = mrope_freqs(positions, inv, SECTION, style="interleaved")
    for rank in range(2):
        local = context_parallel_layout(params.cu_seqlens_q_padded, total, 2, rank).local_index
        x = torch.randn(total // 2, 2, 32, generator=torch.Generator().manual_seed(rank))
        expected = _apply_rotary_pos_emb_bshd(x[:, None], whole[local],
                                              rotary_interleaved=True)[:, 0]
        freqs = thd_freqs_for_megatron(
            mrope_freqs(positions[:, local], inv, SECTION, style="interleaved"), params, 2, rank)
        got = _apply_rotary_pos_emb_thd(x, params.cu_seqlens_q_padded, freqs,
                                        rotary_interleaved=True, cp_group=_FakeGroup(2, rank))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert torch.equal(got[..., 16:], x[..., 16:])  # the unrotated half
        assert (got[..., :16] - x[..., :16]).abs().max() > 0.1


def test_mtp_packed_documents_equal_each_document_alone(glm45):
    """MTP trained (weight 0.3) on two documents packed with padding (THD): every gradient,
    the MTP layer's included, equals the sum over each document run alone (sbhd): megatron's
    MTP roll stays inside each document (``models/mtp.py`` gives it the padded boundaries) and
    the loss mask keeps padding out of the MTP loss."""
    from qwen3_reference import packed_params

    hf, _ = glm45
    extra = _mtp_release_tensors(hf, GLM45_TEXT["num_hidden_layers"], seed=8)
    ours = build_ours(glm45v_llm(mtp_num_layers=1, mtp_loss_weight=0.3), hf, moe=True,
                      sandwich=False, fused_gate_up=False, extra=extra)
    lengths, spans = [DOC_A.shape[1], DOC_B.shape[1]], [12, 10]
    ids, labels = _tokens(sum(spans), seed=9), _tokens(sum(spans), seed=10)
    positions = torch.zeros(3, sum(spans), dtype=torch.long)
    mask = torch.zeros(1, sum(spans))
    starts = [0, spans[0]]
    for start, doc in zip(starts, (DOC_A, DOC_B)):
        positions[:, start:start + doc.shape[1]] = doc
        mask[:, start:start + doc.shape[1]] = 1.0

    def grads_of(*args, **kwargs):
        ours.zero_grad(set_to_none=True)
        loss = ours(*args, **kwargs)
        (loss * kwargs["loss_mask"]).sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    packed = grads_of(ids, positions, None, labels=labels, loss_mask=mask,
                      packed_seq_params=packed_params(lengths, spans))
    alone = [grads_of(ids[:, s:s + doc.shape[1]], doc, None,
                      labels=labels[:, s:s + doc.shape[1]],
                      loss_mask=torch.ones(1, doc.shape[1]))
             for s, doc in zip(starts, (DOC_A, DOC_B))]
    assert packed["mtp.layers.0.eh_proj.weight"].abs().max() > 1e-3
    for name, grad in packed.items():  # fp32 summation order: within 1e-5 of the largest
        expected = alone[0][name] + alone[1][name]
        assert (grad - expected).abs().max() <= 1e-5 * expected.abs().max(), name


def test_glm45_text_llm_1d_partial_rope_equals_transformers(megatron_groups):
    """GLM-4.5-Air as a text LLM (``Glm4MoeForCausalLM``: 1D RoPE over the first half of each
    head, NeoX halves) == ours with ``position_embedding: rope`` and ``rotary_fraction: 0.5``
    (megatron's ``RotaryEmbedding`` with ``rotary_percent``); packed, positions restarting per
    document. Control: the whole head rotated gives other logits."""
    from qwen3_reference import packed_params
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(0)
    text = {k: v for k, v in GLM45_TEXT.items() if k != "rope_parameters"}
    config = Glm4MoeConfig(**text, rope_parameters={"rope_type": "default", "rope_theta": THETA,
                                                    "partial_rotary_factor": 0.5})
    config._attn_implementation = "eager"
    hf = Glm4MoeForCausalLM(config).eval()
    _perturb(hf, 11)
    rules = dict(moe=True, sandwich=False, fused_gate_up=False, hf_prefix="model.")
    ours = build_ours(glm45v_llm(position_embedding="rope", mrope_section=None), hf, **rules)
    lengths, spans = [11, 9], [12, 10]
    ids = _tokens(sum(spans), seed=12)
    positions = torch.cat([torch.arange(n) for n in spans])[None]
    params = packed_params(lengths, spans)
    with torch.no_grad():
        got = ours(ids, positions, None, packed_seq_params=params)
        for start, n in zip((0, spans[0]), lengths):
            expected = hf(input_ids=ids[:, start:start + n]).logits
            assert expected.abs().max() > 1.0
            torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)
        whole = build_ours(glm45v_llm(position_embedding="rope", mrope_section=None,
                                      rotary_fraction=1.0), hf, **rules)
        other = whole(ids, positions, None, packed_seq_params=params)
    assert (other - got).abs().max() > 1e3 * ATOL
