"""InternVL3.5: ``model.vision`` is an InternViT tower (300M: LayerNorm, qkv bias; 6B: RMSNorm,
whole-width qk-norm, no qkv bias), ``model.projector`` pixel shuffle 0.5 + ``mlp1``
(``../shared/FAMILIES.md`` §3; transformers 5.25 ``InternVLVisionModel`` /
``InternVLMultiModalProjector`` are the reference, the original remote code runs the same math).

Field names follow MoonViT's ``VisionConfig`` / ``ProjectorConfig`` (``config/vision.py``) where
the concept is the same, so the code that sizes, parallelises and recomputes a tower reads them
alike; each docstring names the HF ``InternVLVisionConfig`` field for the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class InternVisionConfig:
    """InternViT as InternVL3.5 runs it: per-patch Conv2d (bias) -> CLS token prepended ->
    + the learned ``(1 + side^2)``-row table -> pre-norm blocks with layer scale (``x + l1 *
    attn(norm(x))``, ``x + l2 * mlp(norm(x))``; biases on the output projection and the GELU
    MLP) -> no final norm; the CLS row is dropped. One attention segment per 448-px tile."""

    hidden_size: int = 1024
    """Model width (HF ``hidden_size``)."""
    num_layers: int = 24
    """Transformer layers (HF ``num_hidden_layers``; InternVL3.5 uses the last layer's output,
    ``vision_feature_layer = -1``)."""
    num_attention_heads: int = 16
    """Attention heads; head dim = hidden_size / num_attention_heads (HF
    ``num_attention_heads``)."""
    ffn_hidden_size: int = 4096
    """MLP width, exact GELU (HF ``intermediate_size``)."""
    patch_size: int = 14
    """Square patch side in pixels (HF ``patch_size``)."""
    in_channels: int = 3
    """Image channels (HF ``num_channels``)."""
    pos_emb_side: int = 32
    """Side of the learned table (HF ``image_size / patch_size``: 448 / 14 = 32;
    ``embeddings.position_embeddings`` is ``[1, 1 + 32*32, hidden]``, row 0 the CLS token's).
    Tiles are always 448 px, so the table is used as is; another grid is resized bicubically
    (``align_corners=False``) as transformers does."""
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    """Block norms (HF ``norm_type``): LayerNorm (300M) or RMSNorm (6B)."""
    norm_epsilon: float = 1e-6
    """Epsilon of the block norms and of the qk-norm (HF ``layer_norm_eps``)."""
    qkv_bias: bool = True
    """Biases on q, k, v (HF ``attention_bias``; 300M yes, 6B no). The output projection and
    the MLP always have biases."""
    qk_norm: bool = False
    """RMSNorm of q and of k over the whole width (all heads together, not per head), before the
    head split (HF ``use_qk_norm``; 6B). Under TP the sum of squares is all-reduced."""
    layer_scale_init: float = 0.1
    """Initial value of the per-channel layer scales ``lambda_1`` / ``lambda_2`` (HF
    ``layer_scale_init_value``; an import overwrites them)."""
    merge_kernel_height: int = 2
    """Patch rows merged into one LLM token: pixel shuffle 0.5 (HF ``downsample_ratio``)."""
    merge_kernel_width: int = 2
    """Patch columns merged into one LLM token (HF ``downsample_ratio``: square)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights (HF ``initializer_range``)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (HF ``attention_dropout``)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches (HF ``hidden_dropout_prob``)."""
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
    """How the tower uses the tensor-parallel ranks (``model.vision.parallel_mode`` of
    ``config/vision.py``): ``split`` replicates the tower over TP and each rank encodes a share
    of the micro-batch's tiles; ``tp`` runs megatron TP (+SP) inside the tower (InternViT-6B)."""

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
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"model.vision.norm_type={self.norm_type!r}; choose layer_norm "
                             "(InternViT-300M) or rms_norm (InternViT-6B)")
        if self.merge_kernel_height != self.merge_kernel_width:
            raise ValueError(
                f"model.vision.merge_kernel_height={self.merge_kernel_height} != "
                f"merge_kernel_width={self.merge_kernel_width}: InternVL's pixel shuffle is "
                "square (one downsample_ratio); set them equal")
        if self.pos_emb_side % self.merge_kernel_height:
            raise ValueError(
                f"model.vision.pos_emb_side={self.pos_emb_side} is not divisible by the merge "
                f"kernel {self.merge_kernel_height}: a tile's grid must pixel-shuffle evenly")
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.vision.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(InternViT: 1e-6)")
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
        """Per-head channels (64 for 300M, 128 for 6B)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        """Patches per LLM token (4: pixel shuffle 0.5)."""
        return self.merge_kernel_height * self.merge_kernel_width

    @property
    def merged_hidden_size(self) -> int:
        """Width of one pixel-shuffled token (4 x 1024 = 4096 for 300M)."""
        return self.hidden_size * self.merge_size

    @property
    def tile_size(self) -> int:
        """Tile side in pixels (448)."""
        return self.pos_emb_side * self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens of one tile (256)."""
        return self.pos_emb_side ** 2 // self.merge_size


@dataclass(kw_only=True)
class InternVLProjectorConfig:
    """InternVL's ``mlp1``: per LLM token, the pixel-shuffled ``kh x kw`` patch features (``k*d``)
    -> LayerNorm(``k*d``) -> Linear ``k*d -> out`` -> GELU (exact) -> Linear ``out -> out``, all
    with biases (HF ``multi_modal_projector.{layer_norm, linear_1, linear_2}``; remote code
    ``mlp1.{0, 1, 3}``)."""

    vision_hidden_size: int = 1024
    """Width of one patch feature (the ViT hidden size)."""
    merge_size: int = 4
    """Patches concatenated into one LLM token (``1 / downsample_ratio^2``)."""
    output_size: int = 4096
    """Width of both linears' output: the LLM hidden size (Qwen3-8B: 4096)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the LayerNorm over the merged row (HF ``nn.LayerNorm`` default 1e-5)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights."""

    def __post_init__(self) -> None:
        for name in ("vision_hidden_size", "merge_size", "output_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.projector.{name}={getattr(self, name)} must be >= 1")
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.projector.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(InternVL: 1e-5)")

    @property
    def input_size(self) -> int:
        """Width of one pixel-shuffled token (4096 for InternViT-300M)."""
        return self.vision_hidden_size * self.merge_size

    @property
    def intermediate_size(self) -> int:
        """Output width of the first linear (the LLM width), the name planning code reads."""
        return self.output_size

    def check_matches(self, vision: InternVisionConfig, llm_hidden_size: int) -> None:
        """Raise ``ValueError`` naming the fix when this projector cannot sit between ``vision``
        and an LLM of width ``llm_hidden_size``."""
        if self.vision_hidden_size != vision.hidden_size:
            raise ValueError(
                f"model.projector.vision_hidden_size={self.vision_hidden_size} != "
                f"model.vision.hidden_size={vision.hidden_size}; set them equal")
        if self.merge_size != vision.merge_size:
            raise ValueError(
                f"model.projector.merge_size={self.merge_size} != merge_kernel_height x "
                f"merge_kernel_width={vision.merge_size} of model.vision; set them equal")
        if self.output_size != llm_hidden_size:
            raise ValueError(
                f"model.projector.output_size={self.output_size} != model.llm.hidden_size="
                f"{llm_hidden_size}; set them equal")


VISION_CONFIG = InternVisionConfig
PROJECTOR_CONFIG = InternVLProjectorConfig


def internvit_300m_config() -> InternVisionConfig:
    """InternViT-300M-448px-V2.5 (InternVL3.5 up to 30B-A3B): 1024 wide, 24 layers, 16 heads,
    LayerNorm, qkv bias."""
    return InternVisionConfig(
        hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=4096,
        patch_size=14, pos_emb_side=32, norm_type="layer_norm", norm_epsilon=1e-6,
        qkv_bias=True, qk_norm=False, parallel_mode="split",
    )


def internvit_6b_config() -> InternVisionConfig:
    """InternViT-6B-448px-V2.5 (InternVL3.5 38B / 241B-A28B): 3200 wide, 45 layers, 25 heads
    (head dim 128), RMSNorm, whole-width qk-norm, no qkv bias, TP inside the tower (25 heads:
    tp must divide 25, i.e. 1, 5 or 25; Megatron-LM pads dummy heads for tp 8, not done here)."""
    return InternVisionConfig(
        hidden_size=3200, num_layers=45, num_attention_heads=25, ffn_hidden_size=12800,
        patch_size=14, pos_emb_side=32, norm_type="rms_norm", norm_epsilon=1e-6,
        qkv_bias=False, qk_norm=True, parallel_mode="tp",
    )


def internvl_projector_config(vision: InternVisionConfig,
                              llm_hidden_size: int = 4096) -> InternVLProjectorConfig:
    """``mlp1`` from ``vision`` into an LLM of width ``llm_hidden_size`` (Qwen3-8B: 4096)."""
    return InternVLProjectorConfig(vision_hidden_size=vision.hidden_size,
                                   merge_size=vision.merge_size, output_size=llm_hidden_size)
