"""Optimizer and learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, or MuonClip (Muon for 2-D hidden matrices + AdamW for the rest, SPEC §2), with
    warmup + cosine or WSD. QK-Clip itself is switched on by ``model.llm.qk_clip`` (and
    ``model.vision.qk_clip``); its tau is ``model.llm.qk_clip_threshold``."""

    optimizer: Literal["adamw", "muon"] = "adamw"
    """``adamw``: AdamW for every parameter. ``muon``: Muon for 2-D hidden matrices (attention,
    MLP, expert and router weights, each orthogonalised as its HF tensor), AdamW for embeddings,
    output head, norms and biases; with ``parallel.use_distributed_optimizer`` each DP rank owns
    whole parameters (megatron's LayerWiseDistributedOptimizer)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Final learning rate of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """warmup + cosine decay, or warmup-stable-decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    wsd_decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final decay."""
    wsd_decay_style: Literal["linear", "cosine", "sqrt"] = "linear"
    """WSD: shape of the final decay."""
    muon_momentum: float = 0.95
    """Muon momentum mu (EMA form: buffer <- mu buffer + (1 - mu) grad)."""
    muon_nesterov: bool = True
    """Muon Nesterov momentum (update = (1 - mu) grad + mu buffer)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations (coefficients 3.4445, -4.7750, 2.0315)."""
    muon_ns_dtype: Literal["bf16", "fp32"] = "bf16"
    """Compute dtype of the Newton-Schulz iteration (bf16 as torch.optim.Muon and Moonlight;
    fp32 for comparison runs)."""
    muon_scale: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """Update scale per matrix: ``0.2 sqrt(max(rows, cols))`` (Moonlight; Muon's update RMS ~
    AdamW's, so both share ``lr``) or Keller Jordan's ``sqrt(max(1, rows / cols))``."""
    muon_router: bool = True
    """MoE router weight ([experts, hidden]) to Muon (Moonlight's rule) or to AdamW."""
    qk_clip_tau: float | None = None
    """Legacy field, kept so older configs load: QK-Clip's one tau is
    ``model.llm.qk_clip_threshold``. A value is moved there when the job is built (and this field
    set back to null); it is refused when the model's tau was set to another value than the
    default 100 (``config/model.py: adopt_legacy_qk_clip_tau``)."""
    vision_lr_mult: float = 1.0
    """Learning-rate multiplier for the vision tower (lr and min_lr)."""
    projector_lr_mult: float = 1.0
    """Learning-rate multiplier for the projector."""
    llm_lr_mult: float = 1.0
    """Learning-rate multiplier for the LLM."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0"
            )
        if not 0.0 <= self.wsd_decay_fraction <= 1.0:
            raise ValueError("optim.wsd_decay_fraction must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(
                f"optim.muon_momentum={self.muon_momentum} must be in [0, 1) (Moonlight: 0.95)")
        if self.muon_ns_steps < 1:
            raise ValueError(
                f"optim.muon_ns_steps={self.muon_ns_steps} must be >= 1 (Moonlight: 5)")
        if self.qk_clip_tau is not None and not self.qk_clip_tau > 0:
            raise ValueError(
                f"optim.qk_clip_tau={self.qk_clip_tau} must be > 0 (SPEC: 100), or null to use "
                "model.llm.qk_clip_threshold")
