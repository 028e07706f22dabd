"""Vision tower (MoonViT / MoonViT-3D) and projector configuration (SPEC §2).

Field names follow megatron-core where one exists (``num_layers``, ``ffn_hidden_size``); the
Hugging Face ``Kimi_K25VisionConfig`` names are given in each docstring for the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(kw_only=True)
class VisionConfig:
    """MoonViT: pre-LN ViT with learned 2D + sin-cos temporal position tables and 2D RoPE."""

    hidden_size: int = 1152
    """Model width (HF ``hidden_size``)."""
    num_layers: int = 27
    """Transformer layers (HF ``num_hidden_layers``)."""
    num_attention_heads: int = 16
    """Attention heads; head dim = hidden_size / num_attention_heads (72 for MoonViT)."""
    ffn_hidden_size: int = 4304
    """MLP width, GELU (tanh approximation) (HF ``intermediate_size``)."""
    patch_size: int = 14
    """Square patch side in pixels; one patch = one ViT token."""
    in_channels: int = 3
    """Image channels."""
    pos_emb_height: int = 64
    """Rows of the learned spatial position table (bicubically resized to each grid)."""
    pos_emb_width: int = 64
    """Columns of the learned spatial position table."""
    temporal_patch_size: int = 4
    """Frames per video chunk (largest t), and rows of the sin-cos temporal table
    (HF ``pos_emb_time``). A chunk of t frames costs the LLM as many tokens as one frame."""
    merge_kernel_height: int = 2
    """Patch rows merged into one LLM token (HF ``merge_kernel_size[0]``)."""
    merge_kernel_width: int = 2
    """Patch columns merged into one LLM token (HF ``merge_kernel_size[1]``)."""
    rope_theta: float = 10000.0
    """Base of the 2D RoPE: freq_i = theta^(-4i/head_dim), i < head_dim/4."""
    rope: bool = True
    """Apply the 2D RoPE to q/k. False only to check an import against a model without it
    (SigLIP: SPEC §2 compares at SigLIP's grid with RoPE off)."""
    norm_epsilon: float = 1e-5
    """LayerNorm epsilon (blocks and final norm; SigLIP uses 1e-6, MoonViT 1e-5)."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights (imports overwrite it)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    recompute: Literal["none", "full", "core_attn"] = "none"
    """Activation recompute: ``full`` recomputes whole layers (megatron 'full'/'uniform'),
    ``core_attn`` only the attention core (megatron 'selective')."""
    recompute_num_layers: int = 1
    """Layers per recomputed chunk when ``recompute='full'``."""
    qk_clip: bool = False
    """QK-Clip (MuonClip) on the ViT too: record per-head max logits and, after each step, scale
    the q/k rows of heads above tau (``optim/qk_clip.py``)."""
    qk_clip_threshold: float | None = None
    """Legacy field, kept so older configs load: there is one tau, ``model.llm.qk_clip_threshold``,
    for the LLM and the ViT. null (default) = that one; a value must equal it (else refused)."""
    log_max_attention_logit: bool = False
    """Record per-head max attention logits for logging only."""
    parallel_mode: Literal["split", "tp"] = "split"
    """How the tower uses the tensor-parallel ranks (``parallel/vision_split.py``). ``split``:
    the tower is replicated over TP and each rank encodes a cost-balanced share of the
    micro-batch's media items (gathered before the projector); ``tp``: megatron TP (+SP) inside
    the tower, every item encoded jointly by the TP group. Either way each item is encoded once
    per TP group. Default ``split``: at TP=2 on 2 CPU cores the tower's forward+backward ran
    2.2x and the whole VLM step 1.7x faster than ``tp`` (medians,
    ``benchmarks/vision_parallel_mode.py``): a small tower gains little from TP and pays its
    per-layer collectives."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "patch_size", "in_channels", "pos_emb_height", "pos_emb_width",
                     "temporal_patch_size", "merge_kernel_height", "merge_kernel_width",
                     "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.vision.num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}; choose heads so the head dim is an integer"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"model.vision head dim {self.head_dim} (hidden_size / num_attention_heads) must "
                "be a multiple of 4: the 2D RoPE splits it into (row, column) x (cos, sin) pairs"
            )
        if self.rope_theta <= 1.0:
            raise ValueError(f"model.vision.rope_theta={self.rope_theta} must be > 1 (e.g. 10000)")
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError("model.vision dropouts must lie in [0, 1)")

    @property
    def head_dim(self) -> int:
        """Per-head channels (72 for MoonViT)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        """Patches per LLM token per frame (4 for a 2x2 merge)."""
        return self.merge_kernel_height * self.merge_kernel_width

    @property
    def merged_hidden_size(self) -> int:
        """Width of one merged token as the projector sees it (4 x 1152 = 4608)."""
        return self.hidden_size * self.merge_size


@dataclass(kw_only=True)
class MergeProjectorBase:
    """What every projector that concatenates ``merge_size`` patch features into one LLM token
    and maps it through two linears declares (Kimi's projector, Keye-VL 1.5's merger). Each
    family's projector config derives from it with its own docstring, defaults and layer order;
    the families' configs stay separate types (``model.family`` picks one)."""

    vision_hidden_size: int = 1152
    """Width of one patch feature (the ViT hidden size; HF ``projection_hidden_size``)."""
    merge_size: int = 4
    """Patch features concatenated into one LLM token (merge_kernel_height x
    merge_kernel_width)."""
    ffn_hidden_size: int | None = None
    """Output width of the first linear; None = vision_hidden_size x merge_size (4608)."""
    output_size: int = 7168
    """LLM hidden size."""
    norm_epsilon: float = 1e-5
    """Epsilon of the projector's LayerNorm."""
    init_method_std: float = 0.02
    """Std of the normal init of linear weights."""

    def __post_init__(self) -> None:
        for name in ("vision_hidden_size", "merge_size", "output_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.projector.{name}={getattr(self, name)} must be >= 1")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ValueError(
                f"model.projector.ffn_hidden_size={self.ffn_hidden_size} must be >= 1 or null"
            )
        if self.norm_epsilon <= 0.0:
            raise ValueError(f"model.projector.norm_epsilon={self.norm_epsilon} must be > 0 "
                             "(e.g. 1e-5)")

    @property
    def input_size(self) -> int:
        """Width of one merged token (4608 for a 1152-wide ViT and a 2x2 merge)."""
        return self.vision_hidden_size * self.merge_size

    @property
    def intermediate_size(self) -> int:
        """Output width of the first linear."""
        return self.ffn_hidden_size or self.input_size

    def check_matches(self, vision: Any, llm_hidden_size: int) -> None:
        """Raise ``ValueError`` naming the fix when this projector cannot sit between
        ``vision`` (any tower config with ``hidden_size`` and ``merge_size``) and an LLM of
        width ``llm_hidden_size``."""
        if self.vision_hidden_size != vision.hidden_size:
            raise ValueError(
                f"model.projector.vision_hidden_size={self.vision_hidden_size} != "
                f"model.vision.hidden_size={vision.hidden_size}; set them equal"
            )
        if self.merge_size != vision.merge_size:
            raise ValueError(
                f"model.projector.merge_size={self.merge_size} != merge_kernel_height x "
                f"merge_kernel_width={vision.merge_size} of model.vision; set them equal"
            )
        if self.output_size != llm_hidden_size:
            raise ValueError(
                f"model.projector.output_size={self.output_size} != model.llm.hidden_size="
                f"{llm_hidden_size}; set them equal"
            )


@dataclass(kw_only=True)
class ProjectorConfig(MergeProjectorBase):
    """Kimi projector: LayerNorm per sub-token -> view -> Linear -> GELU (exact) -> Linear."""

    output_size: int = 7168
    """LLM hidden size (Kimi K2: 7168, Moonlight: 2048)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the per-sub-token LayerNorm (HF ``projection_layer_norm_eps``)."""


def moonvit_config() -> VisionConfig:
    """Real-size MoonViT (Kimi-VL / Kimi K2.5 vision tower, ~400M parameters)."""
    return VisionConfig(
        hidden_size=1152, num_layers=27, num_attention_heads=16, ffn_hidden_size=4304,
        patch_size=14, pos_emb_height=64, pos_emb_width=64, temporal_patch_size=4,
        merge_kernel_height=2, merge_kernel_width=2, rope_theta=10000.0, norm_epsilon=1e-5,
    )


def kimi_projector_config(llm_hidden_size: int = 7168) -> ProjectorConfig:
    """The Kimi projector for MoonViT into an LLM of width ``llm_hidden_size``."""
    return ProjectorConfig(
        vision_hidden_size=1152, merge_size=4, ffn_hidden_size=None,
        output_size=llm_hidden_size, norm_epsilon=1e-5,
    )
