"""Multimodal data configuration: datasets, per-stage mixes, budgets, loader workers (SPEC §10-11).

Sequence length, global batch size, seed and ``pad_to_multiple`` stay in ``DataConfig``; this
dataclass adds what only the multimodal pipeline needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIX_UNITS = ("tokens", "samples")
VERIFY_MODES = ("none", "size", "deep")
VIDEO_BACKENDS = ("auto", "decord", "pyav")
VIDEO_SAMPLERS = ("uniform", "slowfast")
SLOWFAST_REFERENCES = ("last_slow", "previous")


@dataclass(kw_only=True)
class SlowFastConfig:
    """Keye-VL 1.5 SlowFast video encoding (``video_sampler="slowfast"``; see data/slowfast.py)."""

    similarity_threshold: float = 0.95
    """A frame whose patch similarity to its reference frame exceeds this is fast (Keye-VL 1.5
    report: 95%)."""
    fast_token_ratio: float = 0.3
    """A fast frame gets at most this share of a slow frame's patches/tokens (Keye: 30%)."""
    reference: str = "last_slow"
    """Frame each frame is compared with: ``last_slow`` (Keye-VL 1.5's released code: the latest
    slow frame) or ``previous`` (the previous sampled frame)."""
    patch_tolerance: float = 8.0
    """Mean absolute pixel difference (0..255) up to which a 14x14 patch counts as unchanged."""
    max_video_tokens: int | None = None
    """LLM token budget of one video; slow frames get the largest grid (at most
    ``video_chunk_max_patches``) that fits it. None = what the uniform sampler can spend at most:
    ceil(video_max_frames / 4) chunks x video_chunk_max_patches / 4 tokens."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.similarity_threshold < 1.0:
            raise ValueError("data.multimodal.slowfast.similarity_threshold must be in [0, 1), "
                             f"got {self.similarity_threshold}")
        if not 0.0 < self.fast_token_ratio <= 1.0:
            raise ValueError("data.multimodal.slowfast.fast_token_ratio must be in (0, 1], got "
                             f"{self.fast_token_ratio}")
        if self.reference not in SLOWFAST_REFERENCES:
            raise ValueError(f"data.multimodal.slowfast.reference={self.reference!r}; use one of "
                             f"{SLOWFAST_REFERENCES}")
        if not 0.0 <= self.patch_tolerance <= 255.0:
            raise ValueError("data.multimodal.slowfast.patch_tolerance must be in [0, 255], got "
                             f"{self.patch_tolerance}")
        if self.max_video_tokens is not None and self.max_video_tokens < 1:
            raise ValueError("data.multimodal.slowfast.max_video_tokens must be >= 1 or None, "
                             f"got {self.max_video_tokens}")


@dataclass(kw_only=True)
class StageMix:
    """The blend of one training stage."""

    weights: dict[str, float]
    """Dataset name -> share (normalised to sum 1) of LLM tokens (``unit="tokens"``) or of
    samples (``unit="samples"``)."""
    unit: str = "tokens"
    """``tokens``: shares of LLM tokens, converted to sampling weights with each dataset's mean
    tokens per sample (measured at start-up); ``samples``: energon blend weights as given."""
    vision_token_fraction: float | None = None
    """If set (``unit="tokens"`` only): the multimodal datasets together get the token share
    that makes this fraction of all LLM tokens media placeholders (e.g. 0.1 for K2.5 early
    fusion); ``weights`` then only split that share among the multimodal datasets and the rest
    among the text-only ones."""

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("a stage mix needs at least one dataset weight")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {self.weights}")
        if self.unit not in MIX_UNITS:
            raise ValueError(f"mix unit {self.unit!r} unknown; use one of {MIX_UNITS}")
        if self.vision_token_fraction is not None:
            if self.unit != "tokens":
                raise ValueError("vision_token_fraction needs unit='tokens'")
            if not 0.0 < self.vision_token_fraction < 1.0:
                raise ValueError(
                    f"vision_token_fraction must be in (0, 1), got {self.vision_token_fraction}"
                )


def default_mixes() -> dict[str, StageMix]:
    """Stage mixes over the bundled corpus's datasets (report-style ratios)."""
    return {
        # ViT-only / projector-only alignment: captions only.
        "alignment": StageMix(weights={"image_caption": 0.7, "video": 0.3}),
        # K2.5 early fusion: 10% vision tokens from step 0, the rest text.
        "early_fusion": StageMix(
            weights={"image_caption": 0.4, "image_qa": 0.2, "interleaved": 0.2, "video": 0.2,
                     "text": 1.0},
            vision_token_fraction=0.10,
        ),
        # Joint pretraining / annealing: 24% video, 50% image, 26% text (of LLM tokens).
        "joint": StageMix(
            weights={"video": 0.24, "image_caption": 0.25, "image_qa": 0.10,
                     "interleaved": 0.15, "text": 0.26},
        ),
    }


@dataclass(kw_only=True)
class MultimodalDataConfig:
    """Where multimodal shards are, how stages mix them, and the micro-batch budgets."""

    root: str | None = None
    """Directory of prepared datasets (``<root>/<name>/`` each from tools/prepare_data.py);
    None = the bundled synthetic corpus, generated once into ``cache_dir``."""
    cache_dir: str | None = None
    """Where the bundled corpus is generated; None = ``$MEGATRON_VLM_CACHE`` or
    ``~/.cache/megatron_vlm``."""
    datasets: dict[str, str] = field(default_factory=dict)
    """Dataset name -> directory (absolute, or relative to ``root``); names not listed resolve
    to ``<root>/<name>``."""
    stage: str = "joint"
    """Key of ``mixes`` used by the loader."""
    mixes: dict[str, StageMix] = field(default_factory=default_mixes)
    """Stage name -> mix."""
    max_patches_per_micro_batch: int = 16384
    """ViT patch budget P of one packed micro-batch (the LLM budget is DataConfig.seq_length)."""
    image_max_patches: int = 16384
    """Patch budget of one image before padding (HF Kimi K2.5: 16384)."""
    image_min_patches: int | None = None
    """Upscale images whose patch grid would be smaller to at least this many patches (bicubic,
    aspect ratio kept, within ``image_max_patches``; like Qwen2-VL's ``min_pixels``). Not in HF
    Kimi K2.5, which never upscales; None (default) keeps its rule. Small images then cost more
    LLM tokens relative to their text (the tiny early-fusion sweep uses it to reach 50% vision
    tokens on the bundled corpus)."""
    video_chunk_max_patches: int = 4096
    """Patch budget of one frame of a video chunk (HF Kimi K2.5: 4096)."""
    video_fps: float = 2.0
    """Video sampling rate in frames per second."""
    video_max_frames: int = 128
    """Frame budget per video (32 chunks of 4)."""
    video_min_patches_per_frame: int = 256
    """A sample over the token or patch budget that holds video is fitted, not skipped: first
    its frames' patch budget is lowered (navit resize, never upscaling) from
    ``video_chunk_max_patches`` down to this, then ``video_min_fps`` applies (data/video_fit.py).
    A value >= ``video_chunk_max_patches`` turns the resolution step off. Uniform sampler only:
    SlowFast videos are not fitted (``slowfast.max_video_tokens`` bounds them)."""
    video_frame_min_patches: int | None = None
    """Patch floor of one video frame for families that size every frame on its own (Keye-VL
    1.5: None = the released floor of 48 LLM tokens = 192 patches, which upscales small frames).
    Set only to test on tiny clips (``tiny_keye_cpu``: 16 patches, 2x2 tokens a frame, so more
    videos fit a step); a real Keye run keeps None. Not used by Kimi (``video_fit`` sizes its
    chunks)."""
    video_min_fps: float = 0.5
    """Lowest sampling rate a too-long video sample is fitted down to (after its resolution);
    still over a budget there, it is skipped as ``too_long``. A value >= ``video_fps`` turns the
    rate step off."""
    video_backend: str = "auto"
    """``auto`` (decord, PyAV fallback), ``decord`` or ``pyav``."""
    video_sampler: str = "uniform"
    """``uniform``: Kimi K2.5 chunks of 4 frames at one grid; ``slowfast``: Keye-VL 1.5
    SlowFast (static frames at a reduced grid in their own chunks, marked with fast_start/
    fast_end; thresholds in ``slowfast``). SlowFast decodes each video when planning it (the
    labels need pixels): twice per sample instead of once, and at start-up calibration too.
    These are the Kimi family's options (data/slowfast.py: the report's wording with Kimi's
    markers). ``model.family: keye`` always cuts videos into one item per frame by Keye's released
    rules (families/keye/media.py); there ``slowfast`` turns on keye-vl-utils' SlowFast (0.9
    similarity to the last slow frame, its budget search; of ``slowfast.*`` only
    ``max_video_tokens`` applies) and ``uniform`` makes every frame slow."""
    slowfast: SlowFastConfig = field(default_factory=SlowFastConfig)
    """SlowFast thresholds and budgets (used when ``video_sampler="slowfast"``)."""
    markers_loss: bool = True
    """Train on media wrapper tokens (begin/end markers, timestamps); placeholders never."""
    num_workers: int = 2
    """energon worker processes per DP rank (0 = load in the training process)."""
    shuffle_buffer_size: int = 256
    """Samples in energon's shuffle buffer (<= 1 disables)."""
    packing_buffer_size: int | None = None
    """Documents per packing decision; larger buffers pad less (see mm_packing). None = about
    32 micro-batches' worth, from the calibrated tokens per sample (e.g. ~470 at S=1024 on the
    bundled corpus, ~1900 at S=4096)."""
    max_samples_per_sequence: int | None = 100
    """Consecutive samples read from one shard slice before jumping (energon)."""
    calibration_samples: int = 256
    """Samples per dataset read at start-up to convert token shares into sampling weights."""
    verify_shards: str = "size"
    """Start-up shard check against the prepare manifest: ``none``, ``size`` (cheap) or
    ``deep`` (re-read and hash every shard)."""
    max_consecutive_skips: int = 100
    """Abort when this many samples in a row are bad (a dataset of garbage, not bad luck)."""
    skip_warn_every: int = 100
    """Log one summary line every this many skipped samples (per worker)."""

    def __post_init__(self) -> None:
        if self.stage not in self.mixes:
            raise ValueError(
                f"data.multimodal.stage={self.stage!r} has no mix; choose one of "
                f"{sorted(self.mixes)}"
            )
        for name, value in (
            ("max_patches_per_micro_batch", self.max_patches_per_micro_batch),
            ("image_max_patches", self.image_max_patches),
            ("video_chunk_max_patches", self.video_chunk_max_patches),
            ("video_max_frames", self.video_max_frames),
            ("calibration_samples", self.calibration_samples),
            ("max_consecutive_skips", self.max_consecutive_skips),
        ):
            if value < 1:
                raise ValueError(f"data.multimodal.{name} must be >= 1, got {value}")
        if self.image_min_patches is not None and not (
                1 <= self.image_min_patches <= self.image_max_patches):
            raise ValueError(
                f"data.multimodal.image_min_patches={self.image_min_patches} must be between 1 "
                f"and data.multimodal.image_max_patches={self.image_max_patches} (or None: no "
                "upscaling)")
        if self.video_frame_min_patches is not None and self.video_frame_min_patches < 4:
            raise ValueError("data.multimodal.video_frame_min_patches must be >= 4 (one LLM "
                             f"token) or None (the family's floor), got "
                             f"{self.video_frame_min_patches}")
        if self.packing_buffer_size is not None and self.packing_buffer_size < 1:
            raise ValueError("data.multimodal.packing_buffer_size must be >= 1 or None (auto), "
                             f"got {self.packing_buffer_size}")
        if not self.video_fps > 0:
            raise ValueError(f"data.multimodal.video_fps must be > 0, got {self.video_fps}")
        if self.video_min_patches_per_frame < 1:
            raise ValueError("data.multimodal.video_min_patches_per_frame must be >= 1 (e.g. "
                             f"256), got {self.video_min_patches_per_frame}")
        if not self.video_min_fps > 0:
            raise ValueError(f"data.multimodal.video_min_fps must be > 0 (e.g. 0.5), got "
                             f"{self.video_min_fps}")
        if self.num_workers < 0:
            raise ValueError(f"data.multimodal.num_workers must be >= 0, got {self.num_workers}")
        if self.verify_shards not in VERIFY_MODES:
            raise ValueError(f"data.multimodal.verify_shards must be one of {VERIFY_MODES}")
        if self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"data.multimodal.video_backend must be one of {VIDEO_BACKENDS}")
        if self.video_sampler not in VIDEO_SAMPLERS:
            raise ValueError(f"data.multimodal.video_sampler={self.video_sampler!r}; use one of "
                             f"{VIDEO_SAMPLERS}")

    @property
    def mix(self) -> StageMix:
        """The mix of ``stage``."""
        return self.mixes[self.stage]
