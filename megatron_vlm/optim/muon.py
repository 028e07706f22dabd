"""Muon for 2-D hidden matrices, each matrix orthogonalised as the checkpoint names it (SPEC §2).

One step for a parameter ``W`` with gradient ``g`` (momentum ``mu`` = 0.95, Nesterov):

    B <- mu B + (1 - mu) g                   (torch.optim.Muon's EMA form, ``lerp``)
    U <- (1 - mu) g + mu B                   (Nesterov)
    W <- W (1 - lr wd)                       (decoupled weight decay, once per parameter)
    for each block view b of W (and the same view of U):
        W_b <- W_b - lr 0.2 sqrt(max(rows_b, cols_b)) NS5(U_b)

where ``NS5`` is the quintic Newton-Schulz iteration with (3.4445, -4.7750, 2.0315) on
``X / max(||X||_F, eps)`` in bfloat16, transposed when rows > cols. With a single block this is
exactly ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` (tested bit for bit); the blocks are
what megatron fuses and Hugging Face keeps apart (``[gate; up]``, per-expert, q/k/v), described by
:class:`BlockLayout` and chosen per parameter name in ``optim/param_groups.py``.

Relation to Moonlight's reference (``examples/toy_train.py``), which keeps a *sum* momentum
``B_M <- mu B_M + g`` and ``U_M = g + mu B_M``: by induction ``B = (1 - mu) B_M`` and
``U = (1 - mu) U_M``. NS normalises by the Frobenius norm first, so in exact arithmetic the two
orthogonalised updates are equal (up to the ``eps`` in the normaliser: Moonlight divides by
``||X|| + 1e-7``, torch by ``max(||X||, 1e-7)``). What differs is rounding: both run NS in
bfloat16, on inputs scaled by 0.05 relative to each other (not a power of two, so different bf16
mantissas) and with different operation grouping (torch fuses ``addmm``). Measured on 16-384 row
matrices, relative Frobenius error of one step's parameter change: 0.9-1.4% from the float64
iteration, 2-3% from Moonlight's bf16 form (Moonlight's own bf16 NS is ~3% from float64). With
``ns_dtype=torch.float64`` ours equals Moonlight's formula in float64 to ~1e-6
(``tests/unit/test_muon.py`` asserts all of these).

Decoupled weight decay uses the unscaled ``lr`` (as Moonlight and torch): ``W (1 - lr wd)``.

Tensor parallelism: a parameter marked ``tensor_model_parallel`` (megatron's attribute, copied to
fp32 master weights) whose TP group has more than one rank holds a shard. Its update is
all-gathered along ``partition_dim`` into the whole matrix (megatron's shard order), every block is
orthogonalised whole, scaled by the *whole* block's ``0.2 sqrt(max(rows, cols))``, and this rank
keeps its shard; every TP rank computes the same Newton-Schulz ("duplicated" mode). The layout
then describes the gathered matrix (see ``param_groups.muon_layout(..., gathered=True)``: a
gated ``linear_fc1`` gathers as ``[gate_0; up_0; gate_1; up_1]``). The momentum buffer and the
weight decay stay per shard (element-wise). The blocks of a gathered matrix are scaled before the
``lr`` step (``W - lr (s O)`` instead of one fused ``W - (lr s) O``): a last-bit difference.

Per-parameter layouts: a parameter (or fp32 master) carrying a ``muon_layout`` attribute (a
:meth:`BlockLayout.to_tuple`) uses it; otherwise its group's ``"muon_layout"``; otherwise the
whole matrix. Attributes keep layouts out of the checkpointed param groups, so megatron's
group matching on load (by ``wd_mult, lr_mult, ...``) cannot hand one group another's layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_vlm.parallel import comm

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (Keller Jordan; Moonlight; torch.optim.Muon)."""
NS_STEPS = 5
NS_EPS = 1e-7

_TorchMuon = getattr(torch.optim, "Muon", None)  # torch >= 2.9
if _TorchMuon is None:  # pragma: no cover - the pinned torch (2.13) has it
    raise ImportError(
        f"megatron_vlm.optim.muon needs torch.optim.Muon (torch >= 2.9); found torch "
        f"{torch.__version__}"
    )


def newton_schulz(
    x: Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate orthogonalisation ``U S' V^T`` of a 2-D matrix, computed in ``dtype``.

    With ``dtype=torch.bfloat16`` this is torch 2.13's ``torch.optim._muon.
    _zeropower_via_newtonschulz`` operation for operation (tested bit for bit); ``dtype`` exists
    so tests can evaluate the same iteration in float64.
    """
    if x.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(x.shape)}")
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    y = x.to(dtype)
    if tall:
        y = y.T
    # Out of place: ``x.to(dtype)`` is ``x`` itself when already in ``dtype``, and ``x`` may be a
    # view of the momentum buffer (torch 2.13 divides in place there).
    y = y / y.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = y @ y.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, poly, y, beta=a)
    return y.T if tall else y


def match_rms_adamw_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale ``0.2 sqrt(max(rows, cols))``: update RMS ~ AdamW's (~0.2)."""
    return 0.2 * math.sqrt(max(rows, cols))


@dataclass(frozen=True)
class BlockLayout:
    """How one (whole, un-sharded) 2-D parameter is cut into the matrices orthogonalised apart.

    The parameter's memory is viewed as ``[num_groups, *group_shape]`` (``group_shape=None``:
    the parameter itself, one group); each group is split along ``split_dim`` (of the group)
    into ``split_sizes``. With ``per_group`` every (group, part) is its own matrix (experts);
    otherwise part ``i`` of all groups stacked along rows is one matrix (the q, k or v rows of a
    per-group interleaved fused qkv). Every block is a view, so updates write in place.

    Stored in optimizer param groups as a plain tuple (:meth:`to_tuple`) so optimizer state
    dicts stay loadable with ``torch.load(weights_only=True)``.
    """

    num_groups: int = 1
    """Leading groups the flat parameter is viewed as (experts, query groups)."""
    group_shape: tuple[int, int] | None = None
    """Shape of one group; None = the parameter's own 2-D shape (``num_groups`` must be 1)."""
    split_dim: int = 0
    """Dimension of a group that ``split_sizes`` cuts (0 rows, 1 columns)."""
    split_sizes: tuple[int, ...] = ()
    """Sizes along ``split_dim``; empty = no split."""
    per_group: bool = True
    """Each group is its own matrix (True), or part i of all groups is one matrix (False)."""

    def __post_init__(self) -> None:
        if self.group_shape is None and self.num_groups != 1:
            raise ValueError("BlockLayout: num_groups > 1 needs an explicit group_shape")
        if self.split_dim not in (0, 1):
            raise ValueError(f"BlockLayout.split_dim={self.split_dim} must be 0 or 1")
        if not self.per_group and self.split_dim != 0:
            raise ValueError("BlockLayout: stacking groups (per_group=False) needs split_dim=0")

    def to_tuple(self) -> tuple:
        return (self.num_groups, self.group_shape, self.split_dim, self.split_sizes,
                self.per_group)

    @classmethod
    def from_tuple(cls, t: tuple | list | None) -> BlockLayout:
        if t is None:
            return WHOLE
        num_groups, group_shape, split_dim, split_sizes, per_group = t
        return cls(num_groups=num_groups,
                   group_shape=None if group_shape is None else tuple(group_shape),
                   split_dim=split_dim, split_sizes=tuple(split_sizes), per_group=per_group)

    def views(self, t: Tensor) -> list[Tensor]:
        """The blocks of ``t`` as views: 2-D, or 3-D ``[groups, rows, cols]`` when stacked
        (see :func:`block_matrix`). Raises ``ValueError`` when the layout does not tile ``t``."""
        if t.ndim != 2:
            raise ValueError(f"BlockLayout applies to 2-D tensors, got shape {tuple(t.shape)}")
        shape = tuple(t.shape) if self.group_shape is None else self.group_shape
        if self.num_groups * shape[0] * shape[1] != t.numel():
            raise ValueError(
                f"BlockLayout {self} does not tile a tensor of shape {tuple(t.shape)}")
        if self.split_sizes and sum(self.split_sizes) != shape[self.split_dim]:
            raise ValueError(
                f"BlockLayout split_sizes {self.split_sizes} do not sum to dim "
                f"{self.split_dim} of the group shape {shape}")
        grouped = t.view(self.num_groups, *shape)
        parts = (grouped.split(list(self.split_sizes), dim=1 + self.split_dim)
                 if self.split_sizes else (grouped,))
        if self.per_group:
            return [part[g] for g in range(self.num_groups) for part in parts]
        return list(parts)


WHOLE = BlockLayout()


def block_matrix(block: Tensor) -> Tensor:
    """A block as the 2-D matrix it stands for (stacked 3-D blocks flatten groups into rows)."""
    return block if block.ndim == 2 else block.reshape(-1, block.shape[-1])


class Muon(_TorchMuon):
    """``torch.optim.Muon`` with per-parameter blocks and Moonlight's RMS-matching scale.

    Param groups may carry ``"muon_layout"``: a :meth:`BlockLayout.to_tuple` applied to every
    parameter of the group (absent = the whole matrix); a parameter's own ``muon_layout``
    attribute takes precedence. Extra group keys (``max_lr``, ``min_lr``, ``wd_mult`` for
    megatron's scheduler, ``is_expert_parallel``, ``param_names``) pass through.

    Args:
        params: 2-D parameters or param-group dicts.
        lr: learning rate before the per-block ``0.2 sqrt(max(rows, cols))`` scale.
        weight_decay: decoupled weight decay (multiplies ``lr``, not the scaled lr).
        momentum: momentum ``mu`` of the EMA buffer.
        nesterov: Nesterov momentum.
        ns_coefficients / ns_steps / eps: the Newton-Schulz iteration.
        adjust_lr_fn: torch's choice of update scale; ``"match_rms_adamw"`` (Moonlight) is the
            one the SPEC asks for, ``"original"`` (Keller Jordan's ``sqrt(max(1, A/B))``) is
            accepted for comparison runs.
        ns_dtype: compute dtype of the iteration (bfloat16 as torch and Moonlight).
        tp_group / expert_tp_group: tensor-parallel groups of dense / routed-expert parameters
            (groups with ``is_expert_parallel``); shards of size > 1 groups are gathered whole
            for Newton-Schulz (module docstring). None = parameters are whole.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str = "match_rms_adamw",
        ns_dtype: torch.dtype = torch.bfloat16,
        tp_group: dist.ProcessGroup | None = None,
        expert_tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                         ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self.ns_dtype = ns_dtype
        # Process groups are not hyperparameters: kept off the param groups (and checkpoints).
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        for group in self.param_groups:  # fail at construction, not at the first step
            for p in group["params"]:
                shape = self._whole_shape(p, self._tp_group_of(group, p))
                self._layout(group, p).views(torch.empty(shape, device="meta"))

    def _layout(self, group: dict, p: Tensor) -> BlockLayout:
        return BlockLayout.from_tuple(getattr(p, "muon_layout", None) or group.get("muon_layout"))

    def _tp_group_of(self, group: dict, p: Tensor) -> dist.ProcessGroup | None:
        """The TP group ``p`` is sharded over, or None when ``p`` is whole on this rank."""
        if not getattr(p, "tensor_model_parallel", False):
            return None
        tp = self.expert_tp_group if group.get("is_expert_parallel") else self.tp_group
        if tp is None or dist.get_world_size(tp) == 1:
            return None
        return tp

    @staticmethod
    def _whole_shape(p: Tensor, tp: dist.ProcessGroup | None) -> tuple[int, ...]:
        shape = list(p.shape)
        if tp is not None:
            shape[p.partition_dim] *= dist.get_world_size(tp)
        return tuple(shape)

    def _scaled_lr(self, lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
        if adjust_lr_fn == "match_rms_adamw":
            return lr * match_rms_adamw_scale(rows, cols)
        if adjust_lr_fn is None or adjust_lr_fn == "original":
            return lr * math.sqrt(max(1, rows / cols))
        return lr

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            if torch.is_tensor(lr):
                lr = lr.item()
            for param, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                param.mul_(1 - lr * wd)
                layout, tp = self._layout(group, param), self._tp_group_of(group, param)
                if tp is None:
                    for p_block, u_block in zip(layout.views(param), layout.views(update)):
                        matrix = block_matrix(u_block)
                        ortho = self._orthogonalise(group, matrix)
                        scaled = self._scaled_lr(lr, group["adjust_lr_fn"], *matrix.shape)
                        p_block.add_(ortho.reshape(p_block.shape), alpha=-scaled)
                else:
                    param.add_(self._sharded_update(group, param, update, layout, tp), alpha=-lr)
        return loss

    def _orthogonalise(self, group: dict, matrix: Tensor) -> Tensor:
        return newton_schulz(matrix, group["ns_coefficients"], group["ns_steps"], group["eps"],
                             self.ns_dtype)

    def _sharded_update(self, group: dict, param: Tensor, update: Tensor, layout: BlockLayout,
                        tp: dist.ProcessGroup) -> Tensor:
        """This rank's shard of the whole matrix's scaled, orthogonalised update (no ``lr``)."""
        size, dim = dist.get_world_size(tp), param.partition_dim
        parts = [torch.empty_like(update) for _ in range(size)]
        comm.all_gather(parts, update.contiguous(), group=tp)
        whole = torch.cat(parts, dim=dim)  # fresh memory: blocks are overwritten in place
        for block in layout.views(whole):
            matrix = block_matrix(block)
            ortho = self._orthogonalise(group, matrix)
            scale = self._scaled_lr(1.0, group["adjust_lr_fn"], *matrix.shape)
            block.copy_(ortho.reshape(block.shape)).mul_(scale)
        return whole.chunk(size, dim=dim)[dist.get_rank(tp)]
