"""Tiny GLM-4.5V / GLM-4.1V transformers models and their release-layout tensors, shared by
``test_glm_model.py`` and ``test_convert_glm.py``.

Text sizes as ``test_glm_llm.py`` (GLM-4.5V: GQA 4/2 heads of 32, partial rotary 0.5, sections
[2, 3, 3], a dense first layer then 8 sigmoid-routed experts + 1 shared; GLM-4.1V: dense, hidden
128); the vision model 2 layers of 32 with a 4x4 position table. Media token ids are those of
:data:`TOK`, a character tokenizer with GLM's six special tokens at 122..127.
"""

from __future__ import annotations

import torch
from hf_fixtures import perturb_all

from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.families.glm.media import GLM_SPECIAL_TOKENS, glm_token_ids

VOCAB = 128
ROPE = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
        "mrope_section": [2, 3, 3]}
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=14,
              image_size=56, spatial_merge_size=2, temporal_patch_size=2)
GLM45_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, routed_scaling_factor=1.5, first_k_dense_replace=1,
                  n_group=1, topk_group=1, norm_topk_prob=True, attention_bias=True,
                  rms_norm_eps=1e-5, max_position_embeddings=256, rope_parameters=ROPE)
GLM41_TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=256, rope_parameters=ROPE)


class _Chars:
    """A tiny text tokenizer: one id per character below 120; GLM's six media tokens follow at
    122..127 (``SpecialTokensTokenizer``)."""

    vocab_size, eos_id, pad_id = 122, 120, 121

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 120 for c in text]


TOK = SpecialTokensTokenizer(_Chars(), GLM_SPECIAL_TOKENS)
IDS = glm_token_ids(TOK)
MEDIA_IDS = dict(image_token_id=IDS.image, video_token_id=IDS.video,
                 image_start_token_id=IDS.begin_of_image, image_end_token_id=IDS.end_of_image,
                 video_start_token_id=IDS.begin_of_video, video_end_token_id=IDS.end_of_video)


def hf_glm(moe: bool):
    """A tiny perturbed ``Glm4vMoeForConditionalGeneration`` (``moe``) or
    ``Glm4vForConditionalGeneration`` in eval mode, eager attention."""
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = GLM45_TEXT if moe else GLM41_TEXT
    config_cls = Glm4vMoeConfig if moe else Glm4vConfig
    config = config_cls(text_config=text, vision_config=dict(
        VISION, out_hidden_size=text["hidden_size"]), **MEDIA_IDS)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    model = (Glm4vMoeForConditionalGeneration if moe else Glm4vForConditionalGeneration)(config)
    with torch.no_grad():
        # std ~0.1-0.15 on every weight: sharp attention, so a wrong position or patch order
        # reaches the logits; random fp32 expert bias that changes the routing.
        perturb_all(model, seed=1, scale=0.3)
        if not moe:
            for p in model.model.language_model.parameters():
                p.mul_(0.8)  # hidden 128: keeps the logits ~5
    return model.eval()


def release_state(hf) -> dict[str, torch.Tensor]:
    """transformers' tensors under the release names (fused in-memory experts split)."""
    out = {}
    for key, value in hf.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            pre = key[: -len("gate_up_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = t.chunk(2)
        elif key.endswith("mlp.experts.down_proj"):
            pre = key[: -len("down_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.down_proj.weight"] = t
        else:
            out[key] = value
    return out


LLM_PREFIX = "model.language_model."


def mtp_release_tensors(hf, seed: int) -> dict[str, torch.Tensor]:
    """One MTP layer in the release layout (HF layer ``num_hidden_layers``, Megatron-Bridge's
    GLM-4.5 names under ``model.language_model.``): its decoder layer a perturbed copy of the
    last layer, random ``enorm`` / ``hnorm`` / ``eh_proj`` / ``shared_head.norm``."""
    layers = hf.config.text_config.num_hidden_layers
    last, mtp = f"{LLM_PREFIX}layers.{layers - 1}.", f"{LLM_PREFIX}layers.{layers}."
    gen = torch.Generator().manual_seed(seed)
    out = {k.replace(last, mtp, 1): v + 0.05 * torch.randn(v.shape, generator=gen)
           for k, v in release_state(hf).items() if k.startswith(last)}
    hidden = hf.config.text_config.hidden_size
    for name in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{mtp}{name}.weight"] = torch.empty(hidden).uniform_(0.5, 1.5, generator=gen)
    out[f"{mtp}eh_proj.weight"] = 0.2 * torch.randn(hidden, 2 * hidden, generator=gen)
    return out
