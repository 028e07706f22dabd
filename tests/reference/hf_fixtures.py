"""Fixtures for checks against Hugging Face transformers (5.23, ``transformers.models.kimi_k25``).

Tiny fp32 models: vision hidden 32, 2 layers, 4 heads (head dim 8), an 8x8 position table (so a
6x8 or 10x4 grid is resampled), LLM hidden 48. Every HF parameter is perturbed away from its init
(LayerNorm weights 1, biases 0...) so that a wrong mapping of any tensor changes the output.
"""

from __future__ import annotations

import pytest
import torch

VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "pos_emb_height": 8, "pos_emb_width": 8, "pos_emb_time": 4,
          "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}}
TEXT = {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128,
        "intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1}
NUM_HEADS = VISION["num_attention_heads"]


@pytest.fixture(scope="session")
def megatron_groups():
    """World-size-1 process groups; reused when another test module already made them."""
    from megatron_vlm.parallel.init import ensure_single_process_groups

    ensure_single_process_groups()


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")
def hf_kimi():
    """A tiny ``Kimi_K25ForConditionalGeneration`` (vision tower, projector, DeepSeek-V3 LLM)."""
    from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    torch.manual_seed(0)
    config = Kimi_K25Config(vision_config=VISION, text_config=TEXT, projection_hidden_size=32,
                            tie_word_embeddings=False)
    model = Kimi_K25ForConditionalGeneration(config).eval()
    perturb(model.model.vision_tower, seed=1)
    perturb(model.model.mm_projector, seed=2)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(hf_kimi, tmp_path_factory):
    """The tensors ``save_pretrained`` writes for ``hf_kimi`` (the released-checkpoint layout)."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("kimi_k25_tiny")
    hf_kimi.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="session")
def ours_from_hf(megatron_groups, hf_kimi):
    """``build(**vision_overrides)``: our MoonViT with ``hf_kimi``'s vision weights."""
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.vision import VisionConfig
    from megatron_vlm.models.vision.hf_weights import load_state, vision_state_from_hf
    from megatron_vlm.models.vision.moonvit import build_moonvit

    def build(**overrides):
        kwargs = {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                  "ffn_hidden_size": 64, "pos_emb_height": 8, "pos_emb_width": 8,
                  "temporal_patch_size": 4, **overrides}
        model = build_moonvit(VisionConfig(**kwargs), ParallelConfig()).eval()
        state = vision_state_from_hf(hf_kimi.model.vision_tower.state_dict(), NUM_HEADS)
        load_state(model, state)
        return model

    return build


def random_media(grid: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values [sum t*h*w, 3, 14, 14]`` in [-1, 1] and ``grid_thw [M, 3]``."""
    grid_thw = torch.tensor(grid, dtype=torch.long)
    n = int(grid_thw.prod(dim=1).sum())
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 14, 14, generator=gen) * 2 - 1, grid_thw


@pytest.fixture(scope="session")
def media():
    """``make(grid, seed) -> (pixel_values, grid_thw)``."""
    return random_media


# --- checkpoint conversion (tests/reference/test_convert_*.py) -----------------------------------


@torch.no_grad()
def perturb_all(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """``perturb`` plus the router's ``e_score_correction_bias`` buffers (zeros at init)."""
    perturb(module, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, buf in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.add_(scale * torch.randn(buf.shape, generator=gen))


def load_converted(step_dir):
    """Our model (eval) loaded from a checkpoint written by the importer."""
    from megatron_vlm.checkpoint import load_checkpoint, read_manifest
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import load_job_model
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.models.vlm import KimiVLM

    model_cfg = load_job_model(read_manifest(step_dir)["config_yaml"])
    if model_cfg.is_vlm:
        model = KimiVLM(model_cfg, ParallelConfig())
    else:
        model = build_llm(model_cfg.llm, ParallelConfig(), model_cfg.params_dtype)
    load_checkpoint(step_dir, [model], None, None, load_optimizer=False)
    return model.eval()


def rekey_to_release(tensors: dict) -> dict:
    """``save_pretrained``'s K2.5 names (transformers 5.23) -> the release checkpoint's."""
    out = {}
    for k, v in tensors.items():
        k = k.replace("language_model.model.blocks.", "language_model.model.layers.")
        k = k.replace("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed.")
        if k.startswith("model.mm_projector."):
            k = k[len("model."):]
        out[k] = v
    return out


def read_safetensors_dir(path) -> dict:
    """Every tensor of an HF checkpoint directory."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
