"""Optimizer and learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW (Muon joins in the MuonClip issue) with warmup + cosine or WSD."""

    optimizer: Literal["adamw"] = "adamw"
    """Optimizer name."""
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
