"""Tiny InternVL3.5 transformers models (``InternVLForConditionalGeneration``) with each of the
three text models, shared by ``test_internvl_model.py`` and ``test_convert_internvl.py``.

Vision: a 300M-style InternViT (LayerNorm, q/k/v biases, layer scale, CLS + learned table; or
the 6B-style block: RMSNorm, whole-width q/k norms, no q/k/v bias), 2 layers of 32 wide (4
heads), 112-px tiles (8x8 patches of 14, 16 LLM tokens per tile after the 0.5 pixel shuffle),
``mlp1`` into the text width. Text models as the LLM reference tests size them: Qwen3 dense
(hidden 64), Qwen3-MoE (``test_qwen3_moe_llm``: a dense middle layer, top-2 of 8 softmax-routed
experts), GPT-OSS (``test_gpt_oss_llm``: sinks, 6-token sliding window on layers 0 and 2,
clamped SwiGLU, biased router/experts, YaRN). Media ids come from :data:`TOK`, a character
tokenizer with InternVL's three special tokens at 125..127.
"""

from __future__ import annotations

import torch
from hf_fixtures import perturb as add_noise
from internvl_llm_reference import perturb as redraw

from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.families.internvl.media import INTERNVL_SPECIAL_TOKENS, internvl_token_ids

VOCAB = 128
TILE = 112
SIDE = TILE // 14
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              image_size=TILE, patch_size=14, layer_norm_eps=1e-6, norm_type="layer_norm",
              use_qk_norm=False, attention_bias=True)
VISION_6B = dict(VISION, norm_type="rms_norm", use_qk_norm=True, attention_bias=False)
"""The 6B-style block (RMSNorm, whole-width q/k norms, no q/k/v bias) at the same tiny size."""
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1e4}
TEXTS = {
    "qwen3": dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256,
                  rope_parameters=DEFAULT_ROPE),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=48,
                      intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[1], rms_norm_eps=1e-6,
                      max_position_embeddings=256, rope_parameters=DEFAULT_ROPE),
    "gpt_oss": dict(model_type="gpt_oss", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
                    swiglu_limit=1.5, rms_norm_eps=1e-5, max_position_embeddings=256,
                    attention_bias=True,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 64}),
}

LLM_DRAW = {"qwen3": dict(std=0.2, bias_std=0.5), "qwen3_moe": dict(std=0.2, bias_std=0.5),
            "gpt_oss": dict(std=0.12, bias_std=0.3)}
"""Redraw of the text model's weights. GPT-OSS at the LLM test's 0.2 / 0.5 amplifies a 5e-7
change of its input embeddings to 3e-5..7e-5 in its own logits (measured on transformers alone),
so image features equal to 5e-7 could not be checked at 1e-5; 0.12 / 0.3 keeps it checkable."""


class _Chars:
    """One id per character below 120; InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>``
    follow at 125..127 (``SpecialTokensTokenizer``)."""

    vocab_size, eos_id, pad_id = 125, 120, 121

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 120 for c in text]


TOK = SpecialTokensTokenizer(_Chars(), INTERNVL_SPECIAL_TOKENS)
IDS = internvl_token_ids(TOK)


def hf_internvl(kind: str, tied: bool = False, vit6b: bool = False):
    """A tiny perturbed ``InternVLForConditionalGeneration`` with text model ``kind``, eval
    mode, eager attention; ``tied``: the top-level ``tie_word_embeddings``; ``vit6b``: the
    6B-style tower."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    text = TEXTS[kind]
    config = InternVLConfig(vision_config=VISION_6B if vit6b else VISION, text_config=text,
                            downsample_ratio=0.5, image_token_id=IDS.img_context,
                            tie_word_embeddings=tied)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        # The tower and mlp1 off their init (LayerNorm 1/0, layer scale 0.1, zero CLS/table);
        # the text model redrawn (std 0.2, norms in [0.5, 1.5], biases/sinks 0.5) as the LLM
        # reference tests do, so routing, windows and sinks all matter.
        add_noise(model.model.vision_tower, seed=11)
        add_noise(model.model.multi_modal_projector, seed=12)
        redraw(model.model.language_model, seed=13, **LLM_DRAW[kind])
        if not tied:
            redraw(model.lm_head, seed=14, std=0.2)
    return model.eval()


def hf_state(hf) -> dict[str, torch.Tensor]:
    """transformers' in-memory tensors (fused experts as it holds them), tied head left out."""
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


RELEASE_PREFIXES = (("model.language_model.", "language_model.model."),
                    ("lm_head.", "language_model.lm_head."),
                    ("model.vision_tower.", "vision_tower."),
                    ("model.multi_modal_projector.", "multi_modal_projector."))
"""In-memory -> release names (what ``save_pretrained`` writes)."""


def release_name(key: str) -> str:
    for memory, release in RELEASE_PREFIXES:
        if key.startswith(memory):
            return release + key[len(memory):]
    raise KeyError(key)


def release_state(hf) -> dict[str, torch.Tensor]:
    """The release layout (``save_pretrained``'s names) with Qwen3-MoE experts per expert
    (``experts.{E}.gate_proj.weight`` ...); GPT-OSS fused as its release holds them."""
    out = {}
    for key, value in hf_state(hf).items():
        key = release_name(key)
        fused = key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj")
        if not fused or hf.config.text_config.model_type != "qwen3_moe":
            out[key] = value
            continue
        pre, name = key.rsplit(".", 1)
        for e, t in enumerate(value):
            if name == "gate_up_proj":
                out[f"{pre}.{e}.gate_proj.weight"], out[f"{pre}.{e}.up_proj.weight"] = t.chunk(2)
            else:
                out[f"{pre}.{e}.down_proj.weight"] = t
    return out
