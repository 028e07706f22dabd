"""Keye-VL 1.5: ``model.vision`` is a SigLIP-so400m NaViT tower with 2D RoPE, ``model.projector``
the 1.5 merger (``../shared/FAMILIES.md`` §1; where the paper and the released code disagree,
these follow the code: vLLM ``keye.py`` / ``keye_vl1_5.py``, the HF port of Keye-VL 1.5).

Field names follow MoonViT's ``VisionConfig`` / ``ProjectorConfig`` (``config/vision.py``) where
the concept is the same, so the code that sizes, parallelises and recomputes a tower reads them
alike; the HF ``SiglipVisionConfig`` names are given in each docstring for the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vlm.config.vision import MergeProjectorBase


@dataclass(kw_only=True)
class SiglipVisionConfig:
    """SigLIP-so400m-patch14-384 as Keye-VL 1.5 runs it: pre-LN ViT (LayerNorm eps 1e-6,
    biases, GELU-tanh MLP, post-layernorm), per-patch Conv2d, the 27x27 absolute table
    bilinear-resized to every grid, 2D RoPE on q/k; NaViT packing with one attention segment per
    image or video frame (temporal patch 1: a video frame is an image)."""

    hidden_size: int = 1152
    """Model width (HF ``hidden_size``)."""
    num_layers: int = 27
    """Transformer layers (HF ``num_hidden_layers``)."""
    num_attention_heads: int = 16
    """Attention heads; head dim = hidden_size / num_attention_heads (72)."""
    ffn_hidden_size: int = 4304
    """MLP width, GELU (tanh approximation) (HF ``intermediate_size``)."""
    patch_size: int = 14
    """Square patch side in pixels; one patch = one ViT token (HF ``patch_size``)."""
    in_channels: int = 3
    """Image channels (HF ``num_channels``)."""
    pos_emb_side: int = 27
    """Side of the learned absolute position table (HF ``image_size / patch_size``: 384 / 14 =
    27, ``embeddings.position_embedding`` is ``[27*27, hidden]``), bilinearly resized
    (``align_corners=False``) to each frame's patch grid."""
    rope_theta: float = 10000.0
    """Base of the 2D RoPE: ``inv_freq = 1 / theta^(arange(0, d/2, 2) / (d/2))`` (d = head
    dim); a head rotates ``[row * f | col * f]`` repeated twice, NeoX rotate-half."""
    merge_kernel_height: int = 2
    """Patch rows merged into one LLM token (Keye ``merge_kernel_size[0]``)."""
    merge_kernel_width: int = 2
    """Patch columns merged into one LLM token (Keye ``merge_kernel_size[1]``)."""
    norm_epsilon: float = 1e-6
    """LayerNorm epsilon of the blocks and the post-layernorm (HF ``layer_norm_eps``)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights (a SigLIP or Keye import overwrites it)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (HF ``attention_dropout``)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    recompute: Literal["none", "full", "core_attn"] = "none"
    """Activation recompute: ``full`` recomputes whole layers (megatron 'full'/'uniform'),
    ``core_attn`` only the attention core (megatron 'selective')."""
    recompute_num_layers: int = 1
    """Layers per recomputed chunk when ``recompute='full'``."""
    qk_clip: bool = False
    """QK-Clip (MuonClip) on the tower too, with the LLM's tau ``model.llm.qk_clip_threshold``
    (``optim/qk_clip.py``)."""
    log_max_attention_logit: bool = False
    """Record per-head max attention logits for logging only."""
    parallel_mode: Literal["split", "tp"] = "split"
    """How the tower uses the tensor-parallel ranks, as for MoonViT (``model.vision.parallel_mode``
    of ``config/vision.py``): ``split`` replicates the tower over TP and each rank encodes a
    cost-balanced share of the micro-batch's frames; ``tp`` runs megatron TP (+SP) inside."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "patch_size", "in_channels", "pos_emb_side", "merge_kernel_height",
                     "merge_kernel_width", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.vision.num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}; choose heads so the head dim is an integer")
        if self.head_dim % 4:
            raise ValueError(
                f"model.vision head dim {self.head_dim} (hidden_size / num_attention_heads) must "
                "be a multiple of 4: the 2D RoPE gives a quarter of it to rows and a quarter to "
                "columns, each as (cos, sin) halves")
        if self.rope_theta <= 1.0:
            raise ValueError(f"model.vision.rope_theta={self.rope_theta} must be > 1 (e.g. 10000)")
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.vision.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(SigLIP: 1e-6)")
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError("model.vision.attention_dropout and hidden_dropout must lie in [0, 1)")
        if self.recompute not in ("none", "full", "core_attn"):
            raise ValueError(f"model.vision.recompute={self.recompute!r}; choose none, full or "
                             "core_attn")
        if self.parallel_mode not in ("split", "tp"):
            raise ValueError(f"model.vision.parallel_mode={self.parallel_mode!r}; choose split "
                             "or tp")

    @property
    def head_dim(self) -> int:
        """Per-head channels (72 for SigLIP-so400m)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        """Patches per LLM token per frame (4 for a 2x2 merge)."""
        return self.merge_kernel_height * self.merge_kernel_width

    @property
    def merged_hidden_size(self) -> int:
        """Width of one merged token as the merger sees it (4 x 1152 = 4608)."""
        return self.hidden_size * self.merge_size


@dataclass(kw_only=True)
class KeyeMergerConfig(MergeProjectorBase):
    """Keye-VL 1.5 merger (``mlp_AR``): per frame, the ``kh x kw`` patches of each block are
    concatenated (``k*d``) -> LayerNorm(``k*d``) -> Linear ``k*d -> k*d`` -> GELU (exact) ->
    Linear ``k*d -> llm hidden``, all with biases. Unlike Kimi's projector the LayerNorm comes
    after the merge, over the whole ``k*d`` row (Keye-VL v1 / Preview normalised each patch
    before it). Fields shared with Kimi's projector: ``MergeProjectorBase``."""

    output_size: int = 4096
    """LLM hidden size (Qwen3-8B: 4096)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the LayerNorm over the merged row (``mlp_AR.pre_norm``: 1e-5)."""


VISION_CONFIG = SiglipVisionConfig
PROJECTOR_CONFIG = KeyeMergerConfig


def keye_vision_config() -> SiglipVisionConfig:
    """Real-size Keye-VL 1.5 tower (SigLIP-so400m-patch14-384, ~400M parameters)."""
    return SiglipVisionConfig(
        hidden_size=1152, num_layers=27, num_attention_heads=16, ffn_hidden_size=4304,
        patch_size=14, pos_emb_side=27, rope_theta=10000.0, merge_kernel_height=2,
        merge_kernel_width=2, norm_epsilon=1e-6,
    )


def keye_merger_config(llm_hidden_size: int = 4096) -> KeyeMergerConfig:
    """The Keye-VL 1.5 merger into an LLM of width ``llm_hidden_size`` (Qwen3-8B: 4096)."""
    return KeyeMergerConfig(vision_hidden_size=1152, merge_size=4, ffn_hidden_size=None,
                            output_size=llm_hidden_size, norm_epsilon=1e-5)
