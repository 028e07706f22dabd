"""GPU kernels for packed (THD) core attention when Transformer Engine is absent.

Each class is a drop-in ``core_attention`` for the local specs (chosen in ``models/specs.py``): it
subclasses :class:`~megatron_vlm.models.attention.PackedSelfAttention` (same constructor, same sbhd
path, same ``current_max_attn_logits`` contract) and replaces only the THD kernel:

* :class:`DocumentSDPAAttention` (``sdpa_doc``): one SDPA call per document, so each call is a
  plain (causal or full) attention that torch routes to its flash / memory-efficient kernels;
  no ``[t, t]`` mask is ever built.
* :class:`FlexPackedAttention` (``flex``): ``flex_attention`` with a document ``BlockMask``; blocks
  that cross documents are skipped. Compiled on CUDA; forward-only on CPU (torch raises on CPU
  backward), which is enough for the CPU equality tests.
* :class:`VarlenPackedAttention` (``varlen``): ``torch.nn.attention.varlen.varlen_attn`` (flash
  attention over ``cu_seqlens``; CUDA, bf16/fp16). Flash needs equal q/k and v head dims, so
  MLA's v (128) is zero-padded to the q/k dim (192) and the output sliced back.

Padding inside a document span (``cu_seqlens_padded``) sits after the document's real tokens. A
real query never attends it: with a causal mask it lies in the future, and bidirectional kernels
attend only real tokens (per-document slices, a key mask, or gathering the real tokens first).
Padding queries get zeros (or, for ``flex``, attend themselves); their outputs are finite and never
reach a real token.

Context parallelism (``parallel.cp > 1``): the base class gathers K/V over the CP group and passes
each kernel the local queries with their global token indices (``q_index``); ``sdpa_doc`` runs
one SDPA per local chunk of a document (causal aligned to the lower right), ``flex`` builds its
block mask over ``[local queries, global keys]``; ``varlen`` refuses CP.

Sinks and sliding windows (GPT-OSS; ``PackedSelfAttention``): ``sdpa_doc`` masks each document's
window explicitly and forms a sink layer's softmax itself; ``flex`` puts the window in its block
mask (blocks outside it are skipped) and rescales its output by ``sigmoid(lse - sink)`` (the
sink's share of the denominator, from flex's log-sum-exp); ``varlen`` refuses both (torch's
flash varlen has no sinks).

Max logits (QK-Clip): every kernel computes the per-head max of the scaled logits explicitly, per
document and in query chunks, under ``no_grad`` -- one extra ``Q K^T`` with fp32 accumulation, only
when ``qk_clip``/``log_max_attention_logit`` is on. (flex's ``AuxRequest(max_scores=True)`` is
CUDA-only in torch 2.13, so it could not be checked here against the reference; not used.)
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from torch.nn.attention.bias import causal_lower_right

from megatron_vlm.models.attention import PackedSelfAttention, window_mask

#: Queries per block of the explicit max-logit computation (bounds its ``[np, chunk, n]`` buffer).
MAX_LOGIT_QUERY_CHUNK = 1024


@dataclass
class DocumentLayout:
    """Where the documents of one packed micro-batch lie (host lists and device tensors)."""

    total: int
    """Tokens in the packed sequence ``t``."""
    starts: list[int]
    """Start of each document's padded span (a tail after the last boundary is one more
    document with real length 0)."""
    real: list[int]
    """Real tokens of each document."""
    padded: list[int]
    """Padded span of each document."""
    segment_ids: torch.Tensor
    """``[t]`` int64 document index of every token (device)."""
    valid: torch.Tensor
    """``[t]`` bool, True on real tokens (device)."""
    cu_padded: torch.Tensor
    """``[n + 1]`` int32 padded boundaries (device)."""
    cu_real: torch.Tensor
    """``[n + 1]`` int32 cumulative real lengths, i.e. boundaries after gathering real tokens."""
    real_index: torch.Tensor | None
    """``[sum(real)]`` int64 positions of the real tokens; None when every token is real."""
    cache: dict = field(default_factory=dict)
    """Per-kernel derived objects (flex block masks), built once per micro-batch."""

    @property
    def max_real(self) -> int:
        return max(self.real) if self.real else 0

    @property
    def max_padded(self) -> int:
        return max(self.padded) if self.padded else 0


_LAYOUTS: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 8


def document_layout(params: PackedSeqParams, total: int, device: torch.device) -> DocumentLayout:
    """The :class:`DocumentLayout` of ``params`` for a sequence of ``total`` tokens.

    Every layer of a micro-batch receives the same ``PackedSeqParams`` object, so the layout (one
    host copy of the boundaries) is built once per micro-batch and reused; the cache holds a
    reference to ``params``, so its ``id`` cannot be recycled while the entry lives.
    """
    key = (id(params), total, str(device))
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] is params:
        _LAYOUTS.move_to_end(key)
        return hit[1]
    if params.cu_seqlens_q_padded is not None:
        cu_pad = params.cu_seqlens_q_padded.detach().to("cpu", torch.long)
        cu = params.cu_seqlens_q.detach().to("cpu", torch.long)
    else:
        cu_pad = cu = params.cu_seqlens_q.detach().to("cpu", torch.long)
    padded = (cu_pad[1:] - cu_pad[:-1]).tolist()
    real = (cu[1:] - cu[:-1]).tolist()
    if any(r > p for r, p in zip(real, padded)):
        raise ValueError(f"a document's real length exceeds its padded span: {real} vs {padded}")
    tail = total - int(cu_pad[-1])
    if tail < 0:
        raise ValueError(
            f"cu_seqlens ends at {int(cu_pad[-1])} but the sequence has {total} tokens")
    if tail:
        padded, real = padded + [tail], real + [0]
    starts = [0]
    for p in padded[:-1]:
        starts.append(starts[-1] + p)
    lengths = torch.tensor(padded)
    segment_ids = torch.repeat_interleave(torch.arange(len(padded)), lengths)
    pos = torch.arange(total) - torch.repeat_interleave(torch.tensor(starts), lengths)
    valid = pos < torch.repeat_interleave(torch.tensor(real), lengths)
    all_real = bool(valid.all())
    layout = DocumentLayout(
        total=total, starts=starts, real=real, padded=padded,
        segment_ids=segment_ids.to(device), valid=valid.to(device),
        cu_padded=F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        cu_real=F.pad(torch.tensor(real).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        real_index=None if all_real else valid.nonzero().squeeze(1).to(device),
    )
    _LAYOUTS[key] = (params, layout)
    while len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


@dataclass(frozen=True)
class QueryRun:
    """Consecutive query rows that are consecutive tokens of one document."""

    row: int
    """First query row."""
    rows: int
    """Rows in the run."""
    doc: int
    """Document index in the :class:`DocumentLayout`."""
    offset: int
    """Position of the first row within its document (0 without context parallelism)."""


def query_runs(layout: DocumentLayout, q_index: torch.Tensor | None) -> list[QueryRun]:
    """The query rows as runs of consecutive tokens of one document: one run per document
    without context parallelism (``q_index`` None); under CP (``q_index`` = global index of each
    local query, ``parallel/context.py``) two runs per document, its two load-balanced chunks.
    Built once per micro-batch and ``q_index`` (cached in ``layout``)."""
    if q_index is None:
        return [QueryRun(s, p, d, 0) for d, (s, p) in enumerate(zip(layout.starts, layout.padded))
                if p]
    key = ("runs", id(q_index))
    hit = layout.cache.get(key)
    if hit is not None and hit[0] is q_index:
        return hit[1]
    rows = q_index.detach().cpu().tolist()
    bounds = torch.tensor(layout.starts + [layout.total])
    docs = (torch.searchsorted(bounds, torch.tensor(rows), right=True) - 1).tolist()
    runs: list[QueryRun] = []
    for i, (g, d) in enumerate(zip(rows, docs)):
        if runs and d == runs[-1].doc and g == rows[i - 1] + 1:
            last = runs[-1]
            runs[-1] = QueryRun(last.row, last.rows + 1, d, last.offset)
        else:
            runs.append(QueryRun(i, 1, d, g - layout.starts[d]))
    layout.cache[key] = (q_index, runs)
    return runs


def _real_queries(run: QueryRun, layout: DocumentLayout) -> int:
    """Real (non-padding) queries at the start of ``run`` (padding follows a document's real
    tokens, so they come first)."""
    return max(0, min(run.offset + run.rows, layout.real[run.doc]) - run.offset)


@torch.no_grad()
def document_max_logits(
    q: torch.Tensor, k: torch.Tensor, layout: DocumentLayout, causal: bool, scale: float,
    chunk: int = MAX_LOGIT_QUERY_CHUNK, q_index: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-head max of the scaled logits ``q k^T * scale`` over legal (real query, real key, same
    document, causal when asked, inside ``window`` when given) entries; ``q [t_q, np, hk]``,
    ``k [t, np, hk]`` -> ``[np]`` fp32 (-inf if none). ``q_index``: global index of each query
    row (context parallelism)."""
    best = torch.full((q.shape[1],), float("-inf"), dtype=torch.float32, device=q.device)
    # bf16/fp16 values are exact in TF32 (10-bit mantissa), so TF32 tensor cores give the fp32
    # result with fp32 accumulation at a fraction of the cost of true fp32 GEMMs.
    with _tf32_if_exact(q.dtype):
        for run in query_runs(layout, q_index):
            nq = _real_queries(run, layout)
            if nq:
                nk = run.offset + nq if causal else layout.real[run.doc]
                best = torch.maximum(best, _run_max(q, k, run.row, nq, layout.starts[run.doc],
                                                    nk, run.offset, causal, scale, chunk,
                                                    window))
    return best


class _tf32_if_exact:
    """Allow TF32 matmuls inside the block when inputs of ``dtype`` are exact in TF32."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.enable = dtype in (torch.bfloat16, torch.float16)

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        if self.enable:
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _run_max(q, k, row: int, nq: int, k_start: int, nk: int, offset: int, causal: bool,
             scale: float, chunk: int, window: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-head max over queries ``q[row : row + nq]`` (document positions ``offset + i``) and
    keys ``k[k_start : k_start + nk]`` (document positions ``0..nk-1``)."""
    best = torch.full((q.shape[1],), float("-inf"), dtype=torch.float32, device=q.device)
    kd = k[k_start : k_start + nk].float().transpose(0, 1)  # [np, nk, hk]
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        qd = q[row + c0 : row + c1].float().transpose(0, 1)  # [np, c, hk]
        logits = torch.matmul(qd, kd.transpose(1, 2)) * scale  # [np, c, nk]
        pos = torch.arange(offset + c0, offset + c1, device=q.device)
        keys = torch.arange(nk, device=q.device)
        if causal:
            logits = logits.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        near = window_mask(pos, keys, window)
        if near is not None:
            logits = logits.masked_fill(~near, float("-inf"))
        best = torch.maximum(best, logits.amax(dim=(1, 2)))
    return best


class DocumentSDPAAttention(PackedSelfAttention):
    """``sdpa_doc``: torch SDPA once per document (real tokens only); under context parallelism
    once per local chunk of a document, against the document's keys up to the chunk's end
    (causal, aligned to the lower right)."""

    def _attend_thd(self, query, key, value, causal, params, q_index=None):
        layout = document_layout(params, key.shape[0], query.device)
        if self.record_max_logits:
            self._update_max_logits(document_max_logits(
                query, key, layout, causal, self.softmax_scale, q_index=q_index,
                window=self.window))
        dropout_p = self.dropout_p if self.training else 0.0
        pieces = []
        heads, dv = value.shape[1], value.shape[2]
        for run in query_runs(layout, q_index):
            nq, start = _real_queries(run, layout), layout.starts[run.doc]
            if nq:
                nk = run.offset + nq if causal else layout.real[run.doc]
                q = query[run.row : run.row + nq].transpose(0, 1).unsqueeze(0)
                k, v = (x[start : start + nk].transpose(0, 1).unsqueeze(0) for x in (key, value))
                if self.window is not None or self.softmax_offset is not None:
                    out = self._attend_masked(q, k, v, run.offset, causal, dropout_p)
                else:
                    out = self._sdpa(q, k, v, causal, dropout_p)
                pieces.append(out[0].transpose(0, 1))
            if run.rows > nq:
                pieces.append(value.new_zeros(run.rows - nq, heads, dv))
        return torch.cat(pieces, dim=0)  # [t_q, np, hv]

    def _attend_masked(self, q, k, v, offset: int, causal: bool,
                       dropout_p: float) -> torch.Tensor:
        """One document's queries (positions ``offset ...``) against its keys (positions ``0
        ...``) with an explicit causal and window mask, and the sinks when the layer has them."""
        rows = torch.arange(offset, offset + q.shape[2], device=q.device)
        keys = torch.arange(k.shape[2], device=q.device)
        mask = (keys[None, :] <= rows[:, None]) if causal else None
        near = window_mask(rows, keys, self.window)
        if near is not None:
            mask = near if mask is None else mask & near
        if self.softmax_offset is not None:
            return self._attend_with_sinks(q, k, v, mask, dropout_p)
        if dropout_p > 0.0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)

    def _sdpa(self, q, k, v, causal: bool, dropout_p: float) -> torch.Tensor:
        mask = None
        if causal and q.shape[2] != k.shape[2]:
            # A later chunk of a document (context parallelism): query i sits at key position
            # nk - nq + i, i.e. causal aligned to the lower right (flash/efficient kernels).
            mask, causal = causal_lower_right(q.shape[2], k.shape[2]), False
        if dropout_p > 0.0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                    scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=self.softmax_scale)


def _no_dropout(module: PackedSelfAttention, kernel: str) -> None:
    if module.dropout_p > 0.0:
        raise ValueError(
            f"attention kernel {kernel!r} has no attention dropout (attention_dropout="
            f"{module.dropout_p}); set model.kernels.attention_kernel=sdpa_doc or the dropout to 0")


class FlexPackedAttention(PackedSelfAttention):
    """``flex``: flex attention with a block-sparse document mask."""

    _compiled: Callable | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _no_dropout(self, "flex")

    @classmethod
    def _flex(cls, device: torch.device) -> Callable:
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention  # CPU: torch's eager path (forward only)
        if cls._compiled is None:
            # Without compilation flex materialises every score; compiled it is a fused kernel.
            # Default (automatic) dynamic shapes: ViT micro-batches vary in length.
            cls._compiled = torch.compile(flex_attention)
        return cls._compiled

    def _block_mask(self, layout: DocumentLayout, causal: bool, device: torch.device,
                    q_index: torch.Tensor | None = None):
        from torch.nn.attention.flex_attention import create_block_mask

        window = self.window
        key = ("flex", causal, window, None if q_index is None else id(q_index))
        hit = layout.cache.get(key)
        if hit is None or hit[0] is not q_index:
            seg, valid = layout.segment_ids, layout.valid
            # Global token index of each query row (context parallelism), else the row itself.
            rows = (torch.arange(layout.total, device=device) if q_index is None
                    else q_index.to(device))

            def mask_mod(b, h, q_idx, kv_idx):
                g = rows[q_idx]
                allowed = (seg[g] == seg[kv_idx]) & valid[kv_idx]
                if causal:
                    allowed = allowed & (g >= kv_idx)
                if window is not None:  # contiguous documents: index distance = position's
                    if window[0] >= 0:
                        allowed = allowed & (g - kv_idx <= window[0])
                    if window[1] >= 0:
                        allowed = allowed & (kv_idx - g <= window[1])
                # A padding query attends itself only, as in the reference, so rows stay finite.
                return allowed | ((g == kv_idx) & ~valid[g])

            hit = (q_index, create_block_mask(
                mask_mod, None, None, len(rows), layout.total, device=device))
            layout.cache[key] = hit
        return hit[1]

    def _attend_thd(self, query, key, value, causal, params, q_index=None):
        layout = document_layout(params, key.shape[0], query.device)
        if self.record_max_logits:
            self._update_max_logits(document_max_logits(
                query, key, layout, causal, self.softmax_scale, q_index=q_index,
                window=self.window))
        block_mask = self._block_mask(layout, causal, query.device, q_index)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, np, t, h]
        # flex runs through torch.compile even in eager mode (torch 2.13 raises with dynamo
        # disabled, e.g. TORCH_COMPILE_DISABLE=1), so dynamo is re-enabled for this call only.
        sinks = self.softmax_offset is not None
        extra = {}
        if sinks:
            from torch.nn.attention.flex_attention import AuxRequest

            extra["return_aux"] = AuxRequest(lse=True)
        with torch._dynamo.config.patch(disable=False):
            out = self._flex(query.device)(q, k, v, block_mask=block_mask,
                                           scale=self.softmax_scale, **extra)
        if sinks:
            # softmax over [logits, sink] = softmax over logits * sum / (sum + e^sink)
            out, aux = out
            lse = aux.lse
            acc = torch.promote_types(out.dtype, torch.float32)
            sink = self.softmax_offset.to(device=lse.device, dtype=acc)
            share = torch.sigmoid(lse.to(acc) - sink.view(1, -1, 1))  # [1, np, t]
            out = (out.to(acc) * share.unsqueeze(-1)).to(out.dtype)
        return out[0].transpose(0, 1)  # [t, np, hv]


def resolve_varlen() -> Callable | None:
    """``torch.nn.attention.varlen.varlen_attn`` when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_call_kwargs(fn: Callable, causal: bool, scale: float) -> tuple[dict, bool]:
    """Keyword arguments for ``fn`` across torch versions, and whether ``fn`` takes ``scale``.

    torch 2.9/2.10 spell the mask ``is_causal`` (no ``scale`` in 2.9); later versions use
    ``window_size=(-1, 0)`` for causal and take ``scale``.
    """
    names = inspect.signature(fn).parameters
    kwargs: dict = {}
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in names:
        kwargs["is_causal"] = causal
    else:
        raise RuntimeError(f"unrecognised varlen_attn signature {inspect.signature(fn)}")
    takes_scale = "scale" in names
    if takes_scale:
        kwargs["scale"] = scale
    return kwargs, takes_scale


class VarlenPackedAttention(PackedSelfAttention):
    """``varlen``: flash attention over ``cu_seqlens`` (``torch.nn.attention.varlen``)."""

    #: The varlen kernel; ``None`` = torch's. Anything honouring ``varlen_attn``'s documented
    #: contract can stand in (the CPU tests use a per-document SDPA implementation of it).
    varlen_fn: Callable | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _no_dropout(self, "varlen")
        if self.cp_size > 1:
            raise NotImplementedError(
                "attention kernel 'varlen' has no context-parallel path; with parallel.cp > 1 "
                "use model.kernels.attention_kernel=sdpa_doc (or the TE backend)")
        if self.softmax_offset is not None or self.window is not None:
            raise NotImplementedError(
                "attention kernel 'varlen' has no attention sinks or sliding window here; use "
                "model.kernels.attention_kernel=flex or sdpa_doc (or the TE backend)")
        if self.varlen_fn is None and resolve_varlen() is None:
            raise RuntimeError("torch.nn.attention.varlen is not available in torch "
                               f"{torch.__version__}; choose another attention kernel")

    def _attend_thd(self, query, key, value, causal, params, q_index=None):
        fn = self.varlen_fn or resolve_varlen()
        layout = document_layout(params, query.shape[0], query.device)
        if self.record_max_logits:
            self._update_max_logits(
                document_max_logits(query, key, layout, causal, self.softmax_scale))
        dk, dv = query.shape[-1], value.shape[-1]
        if dv < dk:  # flash attention needs one head dim for q, k and v
            value = F.pad(value, (0, dk - dv))
        # Causal: padding follows each document's real tokens, so real queries never reach it and
        # the padded boundaries can be used as they are. Bidirectional: attend real tokens only.
        gather = layout.real_index is not None and not causal
        if gather:
            idx = layout.real_index
            query, key, value = query[idx], key[idx], value[idx]
            cu, longest = layout.cu_real, layout.max_real
        else:
            cu, longest = layout.cu_padded, layout.max_padded
        kwargs, takes_scale = varlen_call_kwargs(fn, causal, self.softmax_scale)
        if not takes_scale:  # the kernel applies 1/sqrt(dk): fold the rest into q
            query = query * (self.softmax_scale * math.sqrt(dk))
        out = fn(query, key, value, cu, cu, longest, longest, **kwargs)[..., :dv]
        if gather:
            full = out.new_zeros(layout.total, out.shape[1], dv)
            out = full.index_copy(0, layout.real_index, out)
        return out
