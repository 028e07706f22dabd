"""Core attention for packed (THD) sequences when Transformer Engine is absent.

megatron-core 0.16.1's local ``DotProductAttention`` rejects MLA's separate k/v head dims, packed
THD batches and context parallelism, and records no max logits (SPEC §6). This module is the
``core_attention`` submodule of our local layer specs:

* ``sbhd`` input ``[s, b, np, hn]`` or packed ``thd`` input ``[t, np, hn]`` with ``cu_seqlens``
  (block-diagonal, causal or bidirectional), where documents may be padded
  (``cu_seqlens_*_padded``): padding keys are never attended;
* key and value head dims may differ (MLA: 192 vs 128);
* grouped-query attention (GQA: fewer key/value heads than query heads, megatron's
  ``SelfAttention`` with ``num_query_groups``): each key/value head serves the
  ``np / ng`` consecutive query heads of its group (HF's ``repeat_kv``); it is repeated after
  the context-parallel gather, so the gather moves only the ``ng`` heads;
* per-head max of the scaled pre-softmax logit over unmasked entries, kept as
  ``current_max_attn_logits`` (the attribute megatron's ``MLASelfAttention.clip_qk`` reads) when
  ``config.qk_clip`` or ``config.log_max_attention_logit`` is set;
* GPT-OSS's attention sinks (``config.softmax_type='learnable'``: a learned logit per head in
  every softmax denominator, parameter ``softmax_offset`` as in megatron's ``DotProductAttention``
  and TE's) and sliding window (``config.window_size = (left, 0)`` on the layers megatron's
  ``is_layer_window_attention`` picks: a query sees the ``left`` keys before it in its document);
* context parallelism (``config.context_parallel_size > 1``, THD only): the input holds this CP
  rank's two load-balanced chunks of every document (``parallel/context.py``) while
  ``PackedSeqParams`` stay global (megatron's convention); K and V are all-gathered over the CP
  group into global order (backward: reduce-scatter of dK/dV), and the local queries attend them
  with the causal mask of their *global* positions. MLA's shared rope key is part of K (already
  rotated at this rank's global positions by megatron), so it travels with it. Max logits are
  this rank's queries' maxima; QK-Clip all-reduces them with MAX over DP x CP
  (``optim/qk_clip.py``).

Computation uses torch SDPA with a dense boolean ``[t, t]`` mask (the reference kernel,
``sdpa_mask``, the CPU default); when max logits are recorded, the logits are formed explicitly
(same math, one extra read) so the max is exact. Faster kernels for packed sequences on GPU
(per-document SDPA, flex attention, flash varlen) subclass this one in ``packed_kernels.py``
and replace only :meth:`PackedSelfAttention._attend_thd`; ``models/specs.py`` picks one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    is_layer_window_attention,
    make_sharded_tensors_for_checkpoint,
)

from megatron_vlm.parallel.context import (
    ContextParallelLayout,
    context_parallel_layout,
    gather_context_parallel,
)
from megatron_vlm.parallel.runtime import groups_or_default


def thd_packed_seq_params(
    cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, total: int, device
) -> PackedSeqParams:
    """megatron ``PackedSeqParams`` (THD) for documents with real and padded boundaries.

    Tail padding after the last padded boundary becomes one empty document (real length 0):
    megatron's THD RoPE (``rope_utils.py:235``) splits the sequence by the padded boundaries and
    needs them to cover all ``total`` tokens, and sizes its table by ``max_seqlen`` (the tail may
    be the longest segment). Used by the LLM (text/media packs) and the ViT (one item per doc).
    """
    cu = cu_seqlens.to(dtype=torch.int32).cpu()
    cu_pad = cu_seqlens_padded.to(dtype=torch.int32).cpu()
    if int(cu_pad[-1]) < total:
        cu = torch.cat([cu, cu[-1:]])
        cu_pad = torch.cat([cu_pad, torch.tensor([total], dtype=torch.int32)])
    max_seqlen = int((cu_pad[1:] - cu_pad[:-1]).max())
    cu, cu_pad = cu.to(device), cu_pad.to(device)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
    )


def segment_ids_from_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int, cu_seqlens_real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document id and validity for a packed sequence.

    Args:
        cu_seqlens: ``[n + 1]`` cumulative (padded) document boundaries.
        total: number of tokens in the packed sequence (``>= cu_seqlens[-1]``; tokens after the
            last boundary are padding).
        cu_seqlens_real: ``[n + 1]`` cumulative real lengths; token ``i`` of document ``d`` is
            valid when ``i - start_d < real_len_d``. ``None`` means all tokens are real.

    Returns:
        ``(segment_ids [total], valid [total])``; trailing padding gets segment id ``-1``.
    """
    cu = cu_seqlens.to(torch.long).cpu()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1], lengths)
    if cu_seqlens_real is not None:
        real = (cu_seqlens_real[1:] - cu_seqlens_real[:-1]).to(torch.long).cpu()
        valid = pos < torch.repeat_interleave(real, lengths)
    else:
        valid = torch.ones_like(seg, dtype=torch.bool)
    tail = total - int(cu[-1])
    if tail < 0:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the sequence has {total} tokens")
    seg = torch.cat([seg, torch.full((tail,), -1, dtype=seg.dtype)])
    valid = torch.cat([valid, torch.zeros(tail, dtype=torch.bool)])
    return seg, valid


def window_mask(rows: torch.Tensor, keys: torch.Tensor,
                window: tuple[int, int] | None) -> torch.Tensor | None:
    """``[len(rows), len(keys)]`` True where key position ``k`` is inside query position ``q``'s
    window ``q - left <= k <= q + right`` (megatron / flash convention, -1 = unbounded); None
    without a window."""
    if window is None:
        return None
    left, right = window
    diff = keys[None, :] - rows[:, None]
    mask = torch.ones_like(diff, dtype=torch.bool)
    if left >= 0:
        mask = mask & (diff >= -left)
    if right >= 0:
        mask = mask & (diff <= right)
    return mask


def packed_attention_mask(
    segment_ids: torch.Tensor, valid: torch.Tensor, causal: bool,
    q_index: torch.Tensor | None = None, window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean ``[t_q, t]`` mask (True = attend) for a packed sequence of ``t`` tokens.

    A query attends keys of its own document that are real (not padding), and earlier ones when
    causal, within ``window`` (``(left, right)`` tokens, see :func:`window_mask`) when given. A
    padding query attends only itself, so its (unused) output stays finite.
    ``q_index [t_q]``: global token index of each query row (context parallelism); None = all
    ``t`` tokens in order.
    """
    keys = torch.arange(len(segment_ids), device=segment_ids.device)
    rows = keys if q_index is None else q_index.to(segment_ids.device)
    same = segment_ids[rows][:, None] == segment_ids[None, :]
    mask = same & valid[None, :] & (segment_ids[None, :] >= 0)
    if causal:  # documents are contiguous: "earlier in the document" = lower global index
        mask = mask & (keys[None, :] <= rows[:, None])
    if window is not None:  # contiguous documents: position distance = index distance
        mask = mask & window_mask(rows, keys, window)
    eye = keys[None, :] == rows[:, None]
    mask = torch.where(valid[rows][:, None], mask, eye)
    return mask


_CP_LAYOUTS: dict = {}
_CP_LAYOUT_CACHE_SIZE = 8


def cp_layout_for(params: PackedSeqParams, total: int, cp_size: int, cp_rank: int,
                  device) -> ContextParallelLayout:
    """The context-parallel layout of ``params`` (global boundaries, ``total`` tokens), built
    once per micro-batch: every layer receives the same ``PackedSeqParams`` object (the cache
    keeps a reference to it, so its ``id`` cannot be recycled while the entry lives)."""
    key = (id(params), total, cp_size, cp_rank, str(device))
    hit = _CP_LAYOUTS.get(key)
    if hit is not None and hit[0] is params:
        return hit[1]
    cu = params.cu_seqlens_q_padded
    cu = params.cu_seqlens_q if cu is None else cu
    layout = context_parallel_layout(cu.detach().cpu(), total, cp_size, cp_rank, device)
    _CP_LAYOUTS[key] = (params, layout)
    while len(_CP_LAYOUTS) > _CP_LAYOUT_CACHE_SIZE:
        _CP_LAYOUTS.pop(next(iter(_CP_LAYOUTS)))
    return layout


def repeat_kv_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value with their heads (axis ``head_dim``) repeated to the query's head count
    (GQA; megatron's query heads are group-major, so head ``h`` uses key/value head
    ``h // (np / ng)``). Unchanged when the counts already match."""
    n_q, n_kv = query.shape[head_dim], key.shape[head_dim]
    if n_q == n_kv:
        return key, value
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} key/value heads")
    rep = n_q // n_kv
    return (key.repeat_interleave(rep, dim=head_dim),
            value.repeat_interleave(rep, dim=head_dim))


class PackedSelfAttention(MegatronModule):
    """``core_attention`` for megatron-core layer specs: SDPA over padded or packed sequences."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.cp_size = config.context_parallel_size
        self.cp_group = None
        if self.cp_size > 1:
            # All-gather CP whatever megatron's cp_comm_type (p2p/a2a/allgather) asks of TE.
            # megatron's attention passes its pg_collection; None (a direct build in a test):
            # the process's groups (parallel/runtime.py).
            cp_group = groups_or_default(pg_collection, required=True).cp
            if cp_group.size() != self.cp_size:
                raise ValueError(f"context_parallel_size={self.cp_size} but the CP process "
                                 f"group has {cp_group.size()} ranks")
            self.cp_group = cp_group
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.record_max_logits = bool(config.qk_clip or config.log_max_attention_logit)
        # Sliding window of this layer (megatron's rule on 1-based layer numbers), or None.
        self.window = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        self.softmax_offset = self._build_sinks(config, pg_collection)
        # Per local head, max over all calls since the last reset (megatron's clip_qk resets it).
        self.current_max_attn_logits: torch.Tensor | None = None

    def _build_sinks(self, config: TransformerConfig, pg_collection) -> torch.Tensor | None:
        """Attention sinks, one logit per local head (megatron's ``softmax_type``): learned
        (``learnable``, GPT-OSS), fixed 0 (``off-by-one``) or none (``vanilla``)."""
        kind = getattr(config, "softmax_type", "vanilla")
        if kind == "vanilla":
            return None
        tp = groups_or_default(pg_collection, required=True).tp.size()
        heads = config.num_attention_heads // tp
        if kind == "off-by-one":
            return torch.zeros(heads)
        sinks = torch.nn.Parameter(torch.empty(heads, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(sinks)
        # Each TP rank holds its heads' sinks: sharded, so not counted as TP-duplicated in the
        # gradient norm.
        set_tensor_model_parallel_attributes(sinks, True, 0, 1)
        return sinks

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The learned sinks, sharded over TP by head (as megatron's ``DotProductAttention``)."""
        if not isinstance(self.softmax_offset, torch.nn.Parameter):
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        groups = groups_or_default(required=True)
        dp_cp = (metadata or {}).get("dp_cp_group") or groups.dp_cp
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"softmax_offset": 0}, sharded_offsets, tp_group=groups.tp,
            dp_cp_group=dp_cp)

    def _is_causal(self, attn_mask_type: AttnMaskType | None) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attention output: ``[s, b, np * hv]`` for sbhd input, ``[t, np, hv]`` for thd input."""
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by PackedSelfAttention")
        causal = self._is_causal(attn_mask_type)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, causal, packed_seq_params)
        if self.cp_size > 1:
            raise NotImplementedError(
                "context parallelism in PackedSelfAttention needs packed THD batches "
                "(packed_seq_params with qkv_format='thd'); the sbhd path has no CP split")
        key, value = repeat_kv_heads(query, key, value, head_dim=2)
        # sbhd -> [b, np, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        sq, sk = q.shape[2], k.shape[2]
        if attention_mask is not None:
            # megatron masks are True where attention is *forbidden*.
            mask = ~attention_mask.bool()
            if causal:
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        elif causal:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        if self.window is not None:
            pos = torch.arange(sk, device=q.device)
            near = window_mask(pos[sk - sq:], pos, self.window)
            mask = near if mask is None else mask & near
        out = self._attend(q, k, v, mask)  # [b, np, s, hv]
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_thd(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        causal: bool,
        params: PackedSeqParams,
    ) -> torch.Tensor:
        squeeze_batch = query.dim() == 4  # [t, 1, np, hn] from non-MLA attention
        if squeeze_batch:
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        q_index = None
        if self.cp_size > 1:
            # Local queries (two chunks per document) attend every key of their document:
            # gather K and V (one collective) into global order; PackedSeqParams are global.
            layout = cp_layout_for(params, query.shape[0] * self.cp_size, self.cp_size,
                                   self.cp_group.rank(), query.device)
            dk = key.shape[-1]
            kv = gather_context_parallel(torch.cat([key, value], dim=-1), layout, self.cp_group)
            key, value = kv[..., :dk], kv[..., dk:]
            q_index = layout.local_index
        key, value = repeat_kv_heads(query, key, value, head_dim=1)
        out = self._attend_thd(query, key, value, causal, params, q_index)  # [t_q, np, hv]
        if squeeze_batch:
            out = out.reshape(out.shape[0], 1, -1)
        return out.contiguous()

    def _attend_thd(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        causal: bool,
        params: PackedSeqParams,
        q_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query [t_q, np, hk]``, ``key [t, np, hk]``, ``value [t, np, hv]`` -> ``[t_q, np,
        hv]``: SDPA with a dense block-diagonal mask (the reference; kernels in
        ``packed_kernels.py`` override this). ``q_index [t_q]``: global index of each query row
        (context parallelism: keys are the whole gathered sequence); None: ``t_q == t``."""
        if params.cu_seqlens_q_padded is not None:
            cu_q, cu_q_real = params.cu_seqlens_q_padded, params.cu_seqlens_q
        else:
            cu_q, cu_q_real = params.cu_seqlens_q, None
        seg, valid = segment_ids_from_cu_seqlens(cu_q, key.shape[0], cu_q_real)
        mask = packed_attention_mask(seg, valid, causal, q_index, self.window).to(query.device)
        # [t, np, hn] -> [1, np, t, hn]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        # Padding queries attend themselves only to stay finite; they never count in max logits.
        valid_q = valid if q_index is None else valid[q_index.cpu()]
        record_mask = mask & valid_q.to(mask.device)[:, None]
        return self._attend(q, k, v, mask, record_mask)[0].permute(1, 0, 2)  # [t_q, np, hv]

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        record_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q, k [b, np, s, hk]``, ``v [b, np, s, hv]``, ``mask [s, s]`` True = attend."""
        dropout_p = self.dropout_p if self.training else 0.0
        if self.record_max_logits:
            self._record_max_logits(q, k, mask if record_mask is None else record_mask)
        if self.softmax_offset is not None:
            return self._attend_with_sinks(q, k, v, mask, dropout_p)
        if dropout_p > 0.0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.softmax_scale
                )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)

    def _attend_with_sinks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        """Attention whose softmax denominators also hold ``exp(sink_h)`` (GPT-OSS, HF's eager
        ``sinks`` column; SDPA has no such term): explicit logits, an fp32 softmax over
        ``[logits, sink]``, the sink's column dropped."""
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64)
        logits = torch.matmul(q, k.transpose(-1, -2)).to(acc) * self.softmax_scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        sinks = self.softmax_offset.to(device=logits.device, dtype=acc)
        sink_col = sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
        probs = probs.to(v.dtype)
        if dropout_p > 0.0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = F.dropout(probs, p=dropout_p, training=True)
        return torch.matmul(probs, v)

    @torch.no_grad()
    def _record_max_logits(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        self._update_max_logits(logits.amax(dim=(0, 2, 3)))  # [np]

    def _update_max_logits(self, per_head: torch.Tensor) -> None:
        """Fold one call's per-head max ``[np]`` into the running max (reset by clip_qk)."""
        if self.current_max_attn_logits is None:
            self.current_max_attn_logits = per_head
        else:
            self.current_max_attn_logits = torch.maximum(self.current_max_attn_logits, per_head)
