"""QK-Clip for MLA (the "Clip" of MuonClip, SPEC §2): cap each head's max attention logit at tau.

After the optimizer step, for every MLA layer and (local) head ``h``:

* ``S_h`` = the max scaled pre-softmax logit the core attention recorded over this step's
  micro-batches (``core_attention.current_max_attn_logits``; our attention keeps a running max and
  counts only unmasked, non-padding entries; YaRN's mscale^2 is inside the scale), all-reduced
  with MAX over ``group`` (data parallel x context parallel: ranks that saw other tokens);
* ``eta_h = tau / S_h`` where ``S_h > tau``, else 1 (``min(tau / S_h, 1)`` for positive S_h; a
  head whose max is <= tau, zero or negative is left alone);
* the query weight's rows of head ``h`` are scaled: ``q_nope`` by ``sqrt(eta_h)``, ``q_rope`` by
  ``eta_h``; the up-projection ``linear_kv_up_proj`` (HF ``kv_b_proj``) scales head ``h``'s
  ``k_nope`` rows by ``sqrt(eta_h)``; its ``v`` rows and the shared rope key (the last
  ``qk_rope_head_dim`` rows of ``linear_kv_down_proj``) are untouched. Every logit of head ``h``,
  ``q_nope.k_nope + q_rope.k_rope``, is thereby multiplied by exactly ``eta_h``.

Rows are scaled in the fp32 master weight when megatron keeps one (``param.main_param``, set by
``Float16OptimizerWithFloat16Params`` and by the layer-wise optimizer), and the model's bf16
weight is then overwritten by its cast, so the two never drift. A flat ``DistributedOptimizer``
shard (``main_param_sharded``) holds no whole rows and is refused. Under the layer-wise optimizer
with bf16 params only the owning DP rank has the master: the other ranks leave their bf16 copy
alone and receive the owner's cast through ``param_sync`` (``LayerWiseMuonOptimizer.
sync_params``), so replicas stay identical. fp32 params are their own masters; every rank
scales its replica identically.

Versus megatron-core 0.16.1 ``MLASelfAttention.clip_qk`` (``transformer/multi_latent_attention.py``)
and ``optimizer/qk_clip.clip_qk``: same row rule with ``qk_clip_alpha = 0.5`` (``eta^alpha`` on
``q_nope``, ``eta^(1 - alpha)`` on ``k_nope``); differences: (1) ``clamp(tau / S, max=1)`` gives a
head with a negative max logit a negative ``eta`` and ``eta ** 0.5 = NaN`` weights whenever any
other head of the layer exceeds tau -- we leave such heads alone; (2) it scales the bf16 weight
separately from the fp32 master instead of copying the master's cast (1-ulp drift); (3) it views
``main_param`` as whole rows even when the DistributedOptimizer made it a 1-D shard; (4) it
issues one all-reduce per layer (we issue one for all layers).

The vision tower (MoonViT, ``model.vision.qk_clip``) uses megatron's ``SelfAttention`` with a
fused ``linear_qkv`` whose output rows are megatron's per-group layout ``[q_1..q_{np/ng}; k; v]``
(``SelfAttention.get_query_key_value_tensors``; MoonViT has one query per group, so per head
``[q_h; k_h; v_h]``, and under TP each rank holds its local heads' blocks in the same layout).
:func:`clip_self_attention_` scales head ``h``'s q rows and k rows, weight and bias, by
``sqrt(eta_h)`` (V untouched): with the bias scaled too, ``q_h`` and ``k_h`` are exactly
``sqrt(eta_h)`` times their old values, and the 2D RoPE rotation is linear per head, so every
logit of head ``h`` is multiplied by ``eta_h``. :func:`apply_vit_qk_clip` is the ViT's pass; its
MAX all-reduce must span every rank that encoded other items (:func:`vision_max_logit_group`).
One tau serves both: ``model.llm.qk_clip_threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from torch import nn

from megatron_vlm.parallel import comm
from megatron_vlm.parallel.runtime import groups_or_default


@dataclass
class QKClipStats:
    """What one QK-Clip pass saw and did, per layer (keyed by megatron's 1-based layer number)."""

    max_logits: dict[int, list[float]] = field(default_factory=dict)
    """Per-head max logit after the all-reduce (local heads of this TP rank)."""
    heads_clipped: dict[int, int] = field(default_factory=dict)
    """Heads whose weights were scaled (max logit > tau)."""

    @property
    def layer_max_logit(self) -> dict[int, float]:
        return {layer: max(v) for layer, v in self.max_logits.items()}

    @property
    def max_logit(self) -> float:
        """Max over all layers (``-inf`` when nothing was recorded)."""
        return max((max(v) for v in self.max_logits.values()), default=float("-inf"))

    @property
    def num_heads_clipped(self) -> int:
        return sum(self.heads_clipped.values())


def mla_attentions(model_chunks: nn.Module | Iterable[nn.Module]) -> list[MLASelfAttention]:
    """The MLA self-attention modules of ``model_chunks`` (DDP wrappers and PP chunks alike)."""
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MLASelfAttention)]


def vit_attentions(model_chunks: nn.Module | Iterable[nn.Module]) -> list[SelfAttention]:
    """megatron ``SelfAttention`` modules (fused ``linear_qkv``: the vision tower's) of
    ``model_chunks``."""
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, SelfAttention)]


def _records(attention: nn.Module) -> bool:
    return bool(attention.config.qk_clip or attention.config.log_max_attention_logit)


def qk_clip_eta(max_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``eta_h = tau / S_h`` where ``S_h > tau``, else 1."""
    s = max_logits.float()
    return torch.where(s > threshold, threshold / s, torch.ones_like(s))


def all_reduce_max_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """In-place MAX all-reduce of every tensor over ``group`` with one collective.

    ``group=None`` means "no reduction" (one process, or the caller reduced already); training
    passes the runtime's data x context parallel group (``pg_collection.dp_cp``).
    """
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    comm.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _rows(row_scale: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """``row_scale [rows]`` broadcast over the remaining dims of a weight (2-D) or bias (1-D)."""
    return row_scale.to(dtype).view(-1, *([1] * (dim - 1)))


def _scale_rows_(param: nn.Parameter, row_scale: torch.Tensor, name: str,
                 defer_without_master: bool = False) -> bool:
    """``param[r, :] *= row_scale[r]`` on the fp32 master (then cast into ``param``) or on
    ``param`` itself when there is no master. Returns False (nothing done) for a low-precision
    ``param`` without a local master when ``defer_without_master``: its master lives on another
    rank, which clips it and sends the cast."""
    main = getattr(param, "main_param", None)
    if main is None:
        if getattr(param, "main_param_sharded", False):
            raise RuntimeError(
                f"QK-Clip: {name} has no local master shard under the flat DistributedOptimizer; "
                "QK-Clip needs whole per-head rows (use the layer-wise optimizer for Muon)")
        if defer_without_master and param.dtype != torch.float32:
            return False
        param.data.mul_(_rows(row_scale, param.dtype, param.dim()))
        return True
    if getattr(param, "main_param_sharded", False) or main.shape != param.shape:
        raise RuntimeError(
            f"QK-Clip: the master weight of {name} is a flat DistributedOptimizer shard "
            f"(shape {tuple(main.shape)} vs {tuple(param.shape)}); QK-Clip needs whole per-head "
            "rows (use the layer-wise optimizer for Muon)")
    main.data.mul_(_rows(row_scale, main.dtype, main.dim()))
    param.data.copy_(main.data)  # bf16 model weight = cast of the clipped fp32 master
    return True


@torch.no_grad()
def clip_mla_(attention: MLASelfAttention, eta: torch.Tensor,
              defer_without_master: bool = False) -> list[nn.Parameter]:
    """Scale ``attention``'s q and k_nope rows per head by ``eta [local heads]`` (module doc).

    Returns the two weights (q, kv_up); with ``defer_without_master`` a low-precision weight
    whose master lives on another rank is left for that rank (see :func:`_scale_rows_`)."""
    cfg = attention.config
    heads = attention.num_attention_heads_per_partition
    if eta.shape != (heads,):
        raise ValueError(f"eta has shape {tuple(eta.shape)}, expected ({heads},)")
    nope, rope, v_dim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    root = eta.double().sqrt()
    ones = torch.ones_like(root)
    q_scale = torch.cat([root[:, None].expand(heads, nope),
                         eta.double()[:, None].expand(heads, rope)], dim=1).reshape(-1)
    k_scale = torch.cat([root[:, None].expand(heads, nope),
                         ones[:, None].expand(heads, v_dim)], dim=1).reshape(-1)
    q_name = "linear_q_proj" if cfg.q_lora_rank is None else "linear_q_up_proj"
    weights = []
    for module, scale, name in ((getattr(attention, q_name), q_scale, q_name),
                                (attention.linear_kv_up_proj, k_scale, "linear_kv_up_proj")):
        _scale_rows_(module.weight, scale, name, defer_without_master)
        weights.append(module.weight)
    return weights


@torch.no_grad()
def clip_self_attention_(attention: SelfAttention, eta: torch.Tensor,
                         defer_without_master: bool = False) -> list[nn.Parameter]:
    """Scale ``attention.linear_qkv``'s q and k rows (weight and bias) of head ``h`` by
    ``sqrt(eta[h])`` (local heads), V rows untouched (module doc). Returns the parameters
    touched (as :func:`clip_mla_`)."""
    heads = attention.num_attention_heads_per_partition
    groups = attention.num_query_groups_per_partition
    if eta.shape != (heads,):
        raise ValueError(f"eta has shape {tuple(eta.shape)}, expected ({heads},)")
    if groups != heads:
        raise NotImplementedError(
            f"QK-Clip for grouped-query self-attention ({heads} heads, {groups} key groups per "
            "rank): a shared key has no per-head rows; only one query per key group (MoonViT) "
            "is supported")
    hn = attention.hidden_size_per_attention_head
    root = eta.double().sqrt()[:, None]
    scale = torch.cat([root.expand(heads, 2 * hn), torch.ones_like(root).expand(heads, hn)],
                      dim=1).reshape(-1)  # per head [q_h; k_h; v_h]
    qkv = attention.linear_qkv
    params = [(qkv.weight, "linear_qkv.weight")]
    if getattr(qkv, "bias", None) is not None:
        params.append((qkv.bias, "linear_qkv.bias"))
    if qkv.weight.shape[0] != scale.numel():
        raise ValueError(f"linear_qkv has {qkv.weight.shape[0]} rows, expected {scale.numel()} "
                         f"(3 x {heads} local heads x {hn})")
    for param, name in params:
        _scale_rows_(param, scale, name, defer_without_master)
    return [p for p, _ in params]


def reset_max_logits(model_chunks: nn.Module | Iterable[nn.Module]) -> None:
    """Forget recorded max logits (evaluation forwards record them too): call before a step."""
    for attention in mla_attentions(model_chunks) + vit_attentions(model_chunks):
        if hasattr(attention.core_attention, "current_max_attn_logits"):
            attention.core_attention.current_max_attn_logits = None


def records_max_logits(model_chunks: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether any MLA layer clips or logs its max logits (``qk_clip`` or
    ``log_max_attention_logit`` in its config)."""
    return any(_records(a) for a in mla_attentions(model_chunks))


def vit_records_max_logits(model_chunks: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether the vision tower clips or logs its max logits (``model.vision.qk_clip`` or
    ``log_max_attention_logit``)."""
    return any(_records(a) for a in vit_attentions(model_chunks))


def vision_max_logit_group(model_chunks: nn.Module | Iterable[nn.Module], pg_collection=None
                           ) -> dist.ProcessGroup | None:
    """The ranks whose vision towers saw other items: DP x CP (``pg_collection.dp_cp``), and TP
    too (``tp_dp_cp``) when the tower is replicated over TP and each TP rank encodes its own
    items (``parallel_mode='split'``, recognised by the tower's ``replica_group``).

    ``pg_collection``: the run's groups (None: :func:`~megatron_vlm.parallel.runtime.
    groups_or_default`'s); None when there are none (one process)."""
    groups = groups_or_default(pg_collection)
    if groups is None:
        return None
    return groups.tp_dp_cp if vision_split_over_tp(model_chunks) else groups.dp_cp


def vision_split_over_tp(model_chunks: nn.Module | Iterable[nn.Module]) -> bool:
    """Whether the vision tower is replicated over TP, each TP rank encoding its own items
    (``model.vision.parallel_mode='split'`` at TP > 1: the tower has a ``replica_group``)."""
    chunks = [model_chunks] if isinstance(model_chunks, nn.Module) else list(model_chunks)
    return any(getattr(m, "replica_group", None) is not None
               for chunk in chunks for m in chunk.modules())


@torch.no_grad()
def apply_qk_clip(
    model_chunks: nn.Module | Iterable[nn.Module],
    *,
    group: dist.ProcessGroup | None = None,
    threshold: float | None = None,
    param_sync: Callable[[list[nn.Parameter]], None] | None = None,
) -> QKClipStats:
    """One QK-Clip pass after an optimizer step; resets the recorded max logits.

    Layers whose config has ``qk_clip`` are clipped; layers with only
    ``log_max_attention_logit`` are reported and left alone.

    Args:
        model_chunks: this rank's model chunk(s).
        group: process group of the MAX all-reduce (DP x CP); None = no reduction.
        threshold: tau; default each layer's ``config.qk_clip_threshold`` (SPEC: 100).
        param_sync: for optimizers that step each parameter on one DP rank only (the
            layer-wise optimizer): called once with every clipped weight, the same list on
            every rank of ``group``; it must copy the owner's (clipped) values to the other
            ranks. A bf16 weight without a local fp32 master is then left to its owner. None =
            every rank clips its own copy.

    Returns:
        :class:`QKClipStats` (per-layer per-head max logits after the reduction, heads clipped).
    """
    layers = [a for a in mla_attentions(model_chunks) if _records(a)]
    return _clip_pass(layers, clip_mla_, group, threshold, param_sync)


@torch.no_grad()
def apply_vit_qk_clip(
    model_chunks: nn.Module | Iterable[nn.Module],
    *,
    threshold: float,
    group: dist.ProcessGroup | None = None,
    param_sync: Callable[[list[nn.Parameter]], None] | None = None,
) -> QKClipStats:
    """:func:`apply_qk_clip` for the vision tower's self-attention layers (module doc):
    ``threshold`` is the one tau (``model.llm.qk_clip_threshold``); ``group`` spans every rank
    that encoded other items (:func:`vision_max_logit_group`). Stats are keyed by the tower's
    own 1-based layer numbers."""
    layers = [a for a in vit_attentions(model_chunks) if _records(a)]
    return _clip_pass(layers, clip_self_attention_, group, threshold, param_sync)


def _clip_pass(layers: list[nn.Module], clip_fn, group, threshold, param_sync) -> QKClipStats:
    missing = [a.layer_number for a in layers if a.core_attention.current_max_attn_logits is None]
    if missing:
        raise RuntimeError(
            f"QK-Clip: layers {missing} recorded no max logits this step; the core attention must "
            "record them (config.qk_clip or log_max_attention_logit) and a forward must have run")
    maxima = [a.core_attention.current_max_attn_logits.detach().float().clone() for a in layers]
    all_reduce_max_(maxima, group)
    stats = QKClipStats()
    clipped_weights: list[nn.Parameter] = []
    for attention, s in zip(layers, maxima):
        tau = attention.config.qk_clip_threshold if threshold is None else threshold
        clipped = 0
        if attention.config.qk_clip:
            eta = qk_clip_eta(s, tau)
            clipped = int((eta < 1).sum())
            if clipped:
                clipped_weights += clip_fn(attention, eta,
                                           defer_without_master=param_sync is not None)
        stats.max_logits[attention.layer_number] = s.tolist()
        stats.heads_clipped[attention.layer_number] = clipped
        attention.core_attention.current_max_attn_logits = None
    if param_sync is not None:
        param_sync(clipped_weights)
    return stats


def qk_clip_metrics(
    stats: QKClipStats, num_layers: int, group: dist.ProcessGroup | None = None,
    prefix: str = "qk_clip",
) -> dict[str, float]:
    """Loggable numbers: max logit and heads clipped, overall and per layer, under ``prefix``
    (``vit_qk_clip`` for the vision tower).

    ``group`` (the model-parallel group, TP x PP) joins what other ranks saw: their heads
    (TP) and layers (PP). The result is identical on every rank of ``group``.
    The vision tower lives on the first pipeline stage only: pass its TP group under megatron
    TP, None when it is replicated over TP (every rank then holds the same all-reduced heads).
    """
    maxima = torch.full((num_layers,), float("-inf"), dtype=torch.float64)
    clipped = torch.zeros(num_layers, dtype=torch.float64)
    for layer, heads in stats.max_logits.items():
        maxima[layer - 1] = max(heads)
        clipped[layer - 1] = stats.heads_clipped[layer]
    if group is not None and dist.get_world_size(group) > 1:
        comm.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        comm.all_reduce(clipped, group=group)
    out = {f"{prefix}/max_logit": maxima.max().item(),
           f"{prefix}/heads_clipped": clipped.sum().item()}
    for i in range(num_layers):
        if maxima[i] > float("-inf"):  # layers without MLA (none recorded) are not reported
            out[f"{prefix}/layer{i + 1}/max_logit"] = maxima[i].item()
            out[f"{prefix}/layer{i + 1}/heads_clipped"] = clipped[i].item()
    return out


class QKClipHook:
    """MuonClip's QK-Clip as an optimizer post-step hook (the LLM's MLA layers and, with
    ``model.vision.qk_clip``, the vision tower's attention, one tau).

    ``before_step()`` clears the maxima that evaluation forwards recorded; ``after_step()``
    runs after a successful optimizer step: this step's per-head max logits, MAX over the ranks
    that saw other data, rescale the fp32 master rows of heads above tau (the layer-wise
    optimizer then sends the owners' bf16 casts to the other DP ranks: ``param_sync``), and
    returns the metrics to log. A model that records no max logits gets an inert hook.

    Args:
        model_chunks: this rank's chunks.
        threshold: tau (``model.llm.qk_clip_threshold``); None = each layer's config value.
        param_sync: the optimizer's ``sync_params`` (layer-wise optimizer) or None.
        dp_cp_group: the LLM's MAX group (DP x CP).
        model_parallel_group: joins the LLM's per-layer metrics over TP x PP.
        vit_group: the tower's MAX group (:func:`vision_max_logit_group`).
        vit_metrics_group: joins the tower's metrics (its TP group under megatron TP; None
            when it is replicated over TP).
    """

    def __init__(self, model_chunks: list[nn.Module], *, threshold: float | None,
                 param_sync: Callable[[list[nn.Parameter]], None] | None,
                 dp_cp_group: dist.ProcessGroup | None,
                 model_parallel_group: dist.ProcessGroup | None,
                 vit_group: dist.ProcessGroup | None,
                 vit_metrics_group: dist.ProcessGroup | None) -> None:
        self.chunks = model_chunks
        self.llm_on = records_max_logits(model_chunks)
        self.vit_on = vit_records_max_logits(model_chunks)
        self.threshold = threshold
        self.param_sync = param_sync
        self.groups = (dp_cp_group, model_parallel_group, vit_group, vit_metrics_group)

    @property
    def active(self) -> bool:
        return self.llm_on or self.vit_on

    def before_step(self) -> None:
        """Clear maxima recorded outside this step (evaluation forwards record them too)."""
        if self.active:
            reset_max_logits(self.chunks)

    def after_step(self) -> dict[str, float]:
        """Clip after a successful optimizer step; the step's QK-Clip metrics."""
        dp_cp, model_parallel, vit_group, vit_metrics_group = self.groups
        metrics: dict[str, float] = {}
        if self.llm_on:
            stats = apply_qk_clip(self.chunks, group=dp_cp, threshold=self.threshold,
                                  param_sync=self.param_sync)
            num_layers = mla_attentions(self.chunks)[0].config.num_layers
            metrics = qk_clip_metrics(stats, num_layers, model_parallel)
        if self.vit_on:
            tau = (self.threshold if self.threshold is not None
                   else mla_attentions(self.chunks)[0].config.qk_clip_threshold)
            stats = apply_vit_qk_clip(self.chunks, threshold=tau, group=vit_group,
                                      param_sync=self.param_sync)
            metrics.update(qk_clip_metrics(stats, vit_attentions(self.chunks)[0].config.num_layers,
                                           vit_metrics_group, prefix="vit_qk_clip"))
        return metrics
