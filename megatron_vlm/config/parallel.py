"""Parallel layout. Data parallel size is derived from the world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel sizes; ``dp = world_size / (tp * pp * cp)``."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None = off."""
    cp: int = 1
    """Context parallel size."""
    ep: int = 1
    """Expert parallel size."""
    etp: int | None = None
    """Expert tensor parallel size; None = same as tp."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (megatron needs it for MoE with tp>1)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    use_distributed_optimizer: bool = False
    """megatron's ZeRO-1 DistributedOptimizer over the data-parallel group."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.vpp is not None and self.pp < 2:
            raise ValueError("parallel.vpp needs parallel.pp >= 2; unset vpp or raise pp")

    def data_parallel_size(self, world_size: int) -> int:
        """dp for ``world_size`` ranks, with a clear error when the layout does not divide it."""
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp={model}; "
                f"launch a multiple of {model} ranks or change the layout"
            )
        dp = world_size // model
        if (dp * self.cp * self.tp) % (self.ep * (self.etp or self.tp)):
            raise ValueError(
                f"ep={self.ep} x etp={self.etp or self.tp} must divide dp*cp*tp={dp * self.cp * self.tp}"
            )
        return dp
