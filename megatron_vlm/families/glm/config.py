"""GLM-4.1V / GLM-4.5V: ``model.vision`` is the Glm4v tower (Conv3d over 2 frames, RMSNorm,
bicubic-sampled 24x24 table, 2D RoPE, SwiGLU blocks), ``model.projector`` the 2x2 downsample
convolution and the merger (``../shared/FAMILIES.md`` §2; transformers 5.25 ``Glm4vVisionModel``
and ``Glm4vMoeVisionModel``, the same architecture, are the reference).

Field names follow MoonViT's ``VisionConfig`` / ``ProjectorConfig`` (``config/vision.py``) where
the concept is the same, so the code that sizes, parallelises and recomputes a tower reads them
alike; each docstring names the HF ``Glm4vVisionConfig`` field for the converters.

Where the downsample lives: transformers keeps ``visual.downsample`` (Conv2d 2x2) in the vision
model; here it is the first layer of the projector, because our towers hand the projector one
row of ``kh*kw`` patch features per LLM token (``PackedViT``, split mode gathers those rows).
The HF name map (``hf_vision_names.py``) moves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class GlmVisionConfig:
    """The Glm4v vision tower ("AIMv2-Huge-like"; HF aimv2 is a different model): Conv3d
    patch embedding over ``temporal_patch_size`` frames -> RMSNorm -> + the learned
    ``side x side`` table sampled bicubically at each patch centre -> pre-RMSNorm blocks (2D
    RoPE over the whole head, SwiGLU MLP, no biases but the optional qkv one) -> RMSNorm. One
    attention segment per temporal patch; patches arrive block-major (the ``kh x kw`` patches of
    one LLM token are consecutive), as the Glm4v processors emit them."""

    hidden_size: int = 1536
    """Model width (HF ``hidden_size``)."""
    num_layers: int = 24
    """Transformer layers (HF ``depth``)."""
    num_attention_heads: int = 12
    """Attention heads; head dim = hidden_size / num_attention_heads (128) (HF ``num_heads``)."""
    ffn_hidden_size: int = 4096
    """SwiGLU MLP width of every block. HF has no field of its own for it: its blocks use
    ``out_hidden_size`` (4096), the downsample's output width (``GlmMergerConfig.output_size``)."""
    patch_size: int = 14
    """Square patch side in pixels (HF ``patch_size``)."""
    temporal_patch_size: int = 2
    """Frames in one patch: the Conv3d's temporal kernel (HF ``temporal_patch_size``; an image
    is duplicated to 2 frames by the processor)."""
    in_channels: int = 3
    """Image channels (HF ``in_channels``)."""
    pos_emb_side: int = 24
    """Side of the learned absolute table (HF ``image_size / patch_size``: 336 / 14 = 24;
    ``embeddings.position_embedding`` is ``[24*24, hidden]``), sampled bicubically (``grid_sample``,
    ``align_corners=False``, border padding) at every patch centre of a frame's grid."""
    rope_theta: float = 10000.0
    """Base of the 2D RoPE (HF ``rope_parameters['rope_theta']``): ``inv_freq = 1 /
    theta^(arange(0, d/2, 2) / (d/2))`` (d = head dim); a head rotates ``[row * f | col * f]``
    repeated twice, rotate-half."""
    merge_kernel_height: int = 2
    """Patch rows merged into one LLM token (HF ``spatial_merge_size``)."""
    merge_kernel_width: int = 2
    """Patch columns merged into one LLM token (HF ``spatial_merge_size``: square)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon of the post-conv norm, the blocks and the final norm (HF
    ``rms_norm_eps``)."""
    attention_bias: bool = False
    """Bias on the fused qkv projection (HF ``attention_bias``; the output projection never has
    one)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights (HF ``initializer_range``; an import
    overwrites them)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (HF ``attention_dropout``)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches (HF: none)."""
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
    cost-balanced share of the micro-batch's temporal patches; ``tp`` runs megatron TP (+SP)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "patch_size", "temporal_patch_size", "in_channels", "pos_emb_side",
                     "merge_kernel_height", "merge_kernel_width", "recompute_num_layers"):
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
        if self.merge_kernel_height != self.merge_kernel_width:
            raise ValueError(
                f"model.vision.merge_kernel_height={self.merge_kernel_height} != "
                f"merge_kernel_width={self.merge_kernel_width}: Glm4v merges square blocks "
                "(one spatial_merge_size); set them equal")
        if self.rope_theta <= 1.0:
            raise ValueError(f"model.vision.rope_theta={self.rope_theta} must be > 1 (e.g. 10000)")
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.vision.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(Glm4v: 1e-5)")
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
        """Per-head channels (128 for GLM-4.1V / 4.5V)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        """Patches per LLM token per temporal patch (4 for a 2x2 merge)."""
        return self.merge_kernel_height * self.merge_kernel_width

    @property
    def merged_hidden_size(self) -> int:
        """Width of the patch features of one LLM token (4 x 1536 = 6144)."""
        return self.hidden_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values of one patch as the processor flattens it (``C * T * p * p`` = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(kw_only=True)
class GlmMergerConfig:
    """The Glm4v projector: per LLM token, the ``kh x kw`` patch features -> Conv2d
    (``kh x kw``, stride ``kh x kw``, bias; HF ``visual.downsample``) -> Linear
    ``out -> out`` (no bias) -> LayerNorm -> GELU (exact) -> SwiGLU ``out -> ffn -> out`` (no
    biases) (HF ``visual.merger``: ``proj``, ``post_projection_norm``, ``gate_proj``,
    ``up_proj``, ``down_proj``)."""

    vision_hidden_size: int = 1536
    """Width of one patch feature (the ViT hidden size)."""
    merge_size: int = 4
    """Patches of one LLM token (merge_kernel_height x merge_kernel_width)."""
    output_size: int = 4096
    """Width of the downsample's output, of the merger and of the LLM (HF
    ``out_hidden_size``; it must equal ``model.llm.hidden_size``)."""
    ffn_hidden_size: int = 13696
    """SwiGLU width of the merger (HF vision ``intermediate_size``; 13696 is transformers'
    default, GLM-4.1V's; read a GLM-4.5V checkpoint's config.json before relying on it)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the merger's LayerNorm (HF ``nn.LayerNorm`` default 1e-5)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights."""

    def __post_init__(self) -> None:
        for name in ("vision_hidden_size", "merge_size", "output_size", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.projector.{name}={getattr(self, name)} must be >= 1")
        side = round(self.merge_size ** 0.5)
        if side * side != self.merge_size:
            raise ValueError(f"model.projector.merge_size={self.merge_size} must be a square "
                             "(kh x kw with kh = kw, e.g. 4)")
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.projector.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(Glm4v: 1e-5)")

    @property
    def kernel_side(self) -> int:
        """Side of the downsample convolution (2)."""
        return round(self.merge_size ** 0.5)

    @property
    def input_size(self) -> int:
        """Width of the patch features of one LLM token (6144)."""
        return self.vision_hidden_size * self.merge_size

    @property
    def intermediate_size(self) -> int:
        """The SwiGLU width (``ffn_hidden_size``), under the name planning code reads."""
        return self.ffn_hidden_size

    def check_matches(self, vision: GlmVisionConfig, llm_hidden_size: int) -> None:
        """Raise ``ValueError`` naming the fix when this projector cannot sit between
        ``vision`` and an LLM of width ``llm_hidden_size``."""
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


VISION_CONFIG = GlmVisionConfig
PROJECTOR_CONFIG = GlmMergerConfig


def glm_vision_config() -> GlmVisionConfig:
    """Real-size GLM-4.1V / GLM-4.5V tower (the same for both): 682.2M parameters, 892.5M with
    the 13696-wide projector (= transformers' ``Glm4vVisionModel()``)."""
    return GlmVisionConfig(
        hidden_size=1536, num_layers=24, num_attention_heads=12, ffn_hidden_size=4096,
        patch_size=14, temporal_patch_size=2, pos_emb_side=24, rope_theta=10000.0,
        merge_kernel_height=2, merge_kernel_width=2, norm_epsilon=1e-5, attention_bias=False,
    )


def glm_merger_config(llm_hidden_size: int = 4096, ffn_hidden_size: int = 13696
                      ) -> GlmMergerConfig:
    """The Glm4v projector into an LLM of width ``llm_hidden_size`` (GLM-4 9B and GLM-4.5-Air:
    4096); ``ffn_hidden_size``: the HF vision ``intermediate_size`` of the checkpoint."""
    return GlmMergerConfig(vision_hidden_size=1536, merge_size=4, output_size=llm_hidden_size,
                           ffn_hidden_size=ffn_hidden_size, norm_epsilon=1e-5)
