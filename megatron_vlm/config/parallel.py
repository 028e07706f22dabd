"""Parallel layout and its validation. Data parallel size is derived from the world size.

Every layout megatron-core (or our VLM) cannot run is rejected here, at config time, with the
reason and the fix -- before a process group or a model exists:

* :meth:`ParallelConfig.__post_init__`: the sizes alone (``>= 1``, ``vpp`` needs ``pp >= 2``,
  TP needs sequence parallelism).
* :meth:`ParallelConfig.check_model`: the sizes against the model and the packed sequence
  (heads, FFN widths, experts, layers per stage, ViT heads in ``tp`` mode, sequence alignment);
  ``JobConfig`` calls it.
* :meth:`ParallelConfig.data_parallel_size`: the sizes against the world size (``dp`` and the
  expert grid); ``init_distributed`` calls it right after the rendezvous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from megatron_vlm.config.model import ModelConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_pipeline_layout(layout: str) -> list[str]:
    """A ``pipeline_model_parallel_layout`` string as one string of layer letters per stage,
    unrolled as megatron-core 0.16.1's ``PipelineParallelLayerLayout.parse_str_to_list`` does
    (commas cosmetic, ``(...)*n`` then ``x*n`` repeats)."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    return text.split("|")


def layers_from_layout(layout: str) -> list[int]:
    """Decoder layers (``t``) per stage of a pipeline layout string."""
    return [stage.count("t") for stage in parse_pipeline_layout(layout)]


def pipeline_layout_problems(layout: str, num_stages: int, num_layers: int) -> list[str]:
    """What megatron would refuse in ``layout`` for ``num_stages`` (pp x vpp) stages and
    ``num_layers`` decoder layers (``PipelineParallelLayerLayout.validate_layer_layout``)."""
    stages = parse_pipeline_layout(layout)
    flat = "".join(stages)
    out = []
    bad = sorted(set(flat) - set("ELt"))
    if bad:
        out.append(f"parallel.pipeline_layout={layout!r} has unknown letters {bad}; use E "
                   "(embedding), t (decoder layer), L (loss), | (next stage)")
    if len(stages) != num_stages:
        out.append(f"parallel.pipeline_layout has {len(stages)} stages, pp x vpp = {num_stages}")
    if flat.count("t") != num_layers:
        out.append(f"parallel.pipeline_layout places {flat.count('t')} decoder layers, the model "
                   f"has {num_layers}")
    if not flat.startswith("E") or flat.count("E") != 1:
        out.append("parallel.pipeline_layout must start with the embedding E, once")
    if not flat.endswith("L") or flat.count("L") != 1:
        out.append("parallel.pipeline_layout must end with the loss L, once")
    return out


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
    # megatron DDP communication settings. ``None`` = by capability in
    # ``models/gpu_settings.py`` (off on CPU); ``true`` that cannot be honoured is refused at
    # start-up with the reason.
    overlap_grad_reduce: bool | None = None
    """Start each gradient bucket's all-reduce / reduce-scatter during the last micro-batch's
    backward, as soon as its gradients are complete, instead of after it. Needs CUDA, and a
    model whose every trainable parameter gets a gradient in every step's last micro-batch
    (megatron-core 0.16.1 issues the overlapped collective only then): not a VLM with a
    trainable vision tower or projector, which a text-only micro-batch leaves without one.
    None: on when both hold."""
    overlap_param_gather: bool | None = None
    """Defer the DistributedOptimizer's parameter all-gather after a step to the next forward,
    bucket by bucket. Needs CUDA and megatron's DistributedOptimizer (``use_distributed_optimizer``
    with AdamW; Muon's layer-wise optimizer sends whole parameters itself), and checkpoint saves
    that first force the deferred gather, which ours do not yet do: refused for now, None = off."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient bucket when overlapping the reduce; None = megatron's default
    ``max(4e7, 1e6 * dp)``. Without ``overlap_grad_reduce`` megatron uses one bucket per dtype
    and ignores it."""
    pipeline_layout: str | None = None
    """Decoder layers per (virtual) pipeline stage as megatron's
    ``pipeline_model_parallel_layout``: stages in layer order separated by ``|``, ``E`` the
    embedding (first stage; the ViT and projector sit with it), ``t`` one decoder layer, ``L`` the
    loss (last stage), ``t*n`` / ``(...)*n`` repeats, e.g. ``E,t*7|t*8|t*8|t*4,L``; ``pp x vpp``
    stages. None = the same number of layers per stage. ``tools/plan_parallel.py --stages``
    prints a split balanced for the ViT on stage 0."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"parallel.etp={self.etp} must be >= 1 (or null = tp)")
        if self.vpp is not None and self.vpp < 1:
            raise ValueError(f"parallel.vpp={self.vpp} must be >= 1 (or null = off)")
        if self.vpp is not None and self.pp < 2:
            raise ValueError("parallel.vpp needs parallel.pp >= 2; unset vpp or raise pp")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError(f"parallel.ddp_bucket_size={self.ddp_bucket_size} must be >= 1 "
                             "parameters (or null = megatron's default)")

    @property
    def expert_tp(self) -> int:
        """Expert tensor parallel size (``etp``, defaulting to ``tp``)."""
        return self.etp if self.etp is not None else self.tp

    @property
    def sequence_multiple(self) -> int:
        """What the packed sequence length ``S`` must be a multiple of: ``2*cp*tp`` under CP or
        SP (SPEC §11), else 1."""
        return 2 * self.cp * self.tp if (self.cp > 1 or self.sequence_parallel) else 1

    @property
    def document_multiple(self) -> int:
        """What every document span (``data.pad_to_multiple``) must be a multiple of.

        Context parallelism cuts each document into ``2*cp`` load-balanced causal chunks, and with
        sequence parallelism each chunk is split again over ``tp``: ``2*cp*tp`` (SPEC §11).
        Sequence parallelism alone splits the whole packed sequence (``S``), never a document,
        and attention sees the gathered sequence, so documents need no alignment then.
        """
        if self.cp == 1:
            return 1
        return 2 * self.cp * (self.tp if self.sequence_parallel else 1)

    def layout_problems(self, model: ModelConfig, *, seq_length: int,
                        pad_to_multiple: int) -> list[str]:
        """Every reason this layout cannot run ``model`` on packed sequences of ``seq_length``
        tokens whose documents are padded to ``pad_to_multiple``; empty when it can."""
        llm, tp, etp = model.llm, self.tp, self.expert_tp
        out: list[str] = []
        # --- tensor parallelism: megatron splits heads and FFN columns evenly (core/utils.divide)
        if llm.num_attention_heads % tp:
            out.append(f"parallel.tp={tp} does not divide model.llm.num_attention_heads="
                       f"{llm.num_attention_heads}; choose tp in "
                       f"{_divisors(llm.num_attention_heads)}")
        if (llm.num_experts is None or llm.num_dense_layers) and llm.ffn_hidden_size % tp:
            out.append(f"parallel.tp={tp} does not divide model.llm.ffn_hidden_size="
                       f"{llm.ffn_hidden_size} (dense layers split their FFN columns over tp)")
        if tp > 1 and not self.sequence_parallel:
            out.append(f"parallel.tp={tp} requires sequence parallelism (megatron-core 0.16.1 "
                       "needs it for MoE, moe_layer.py:380, and MLA's duplicated "
                       "down-projections rely on it); set parallel.sequence_parallel=true")
        # --- experts
        if llm.num_experts is None:
            if self.ep > 1 or self.etp not in (None, tp):
                out.append(f"parallel.ep={self.ep} / parallel.etp={self.etp} need an MoE model "
                           "(model.llm.num_experts is null); set ep=1 and etp=null")
        else:
            if llm.num_experts % self.ep:
                out.append(f"parallel.ep={self.ep} does not divide model.llm.num_experts="
                           f"{llm.num_experts}; choose ep in {_divisors(llm.num_experts)}")
            if llm.moe_ffn_hidden_size % etp:
                out.append(f"expert tensor parallel size {etp} (parallel.etp, default tp) does "
                           f"not divide model.llm.moe_ffn_hidden_size={llm.moe_ffn_hidden_size}")
            shared = llm.num_shared_experts * llm.moe_ffn_hidden_size
            if shared and shared % tp:
                out.append(f"parallel.tp={tp} does not divide the shared experts' width "
                           f"{shared} (num_shared_experts x moe_ffn_hidden_size)")
        # --- pipeline: megatron gives every (virtual) stage the same number of layers unless
        # an explicit layout says how many each holds
        stages = self.pp * (self.vpp or 1)
        if self.pipeline_layout is not None:
            out += pipeline_layout_problems(self.pipeline_layout, stages, llm.num_layers)
        elif llm.num_layers % stages:
            what = (f"parallel.pp={self.pp}" if self.vpp is None else
                    f"parallel.pp*vpp={self.pp}*{self.vpp}={stages}")
            out.append(f"{what} does not divide model.llm.num_layers={llm.num_layers}; each "
                       "(virtual) pipeline stage needs the same whole number of layers")
        # --- vision tower: TP inside the ViT (tp mode) splits its heads and MLP; in split mode
        # the tower is replicated over TP and only the projector (always TP) is split.
        if model.vision is not None:
            vis = model.vision
            # A tower config without parallel_mode (a family whose tower has no TP) is split.
            if getattr(vis, "parallel_mode", "split") == "tp" and tp > 1:
                if vis.num_attention_heads % tp:
                    out.append(f"parallel.tp={tp} does not divide model.vision."
                               f"num_attention_heads={vis.num_attention_heads} (vision "
                               "parallel_mode=tp); choose tp in "
                               f"{_divisors(vis.num_attention_heads)} or set "
                               "model.vision.parallel_mode=split")
                if vis.ffn_hidden_size % tp:
                    out.append(f"parallel.tp={tp} does not divide model.vision.ffn_hidden_size="
                               f"{vis.ffn_hidden_size} (vision parallel_mode=tp); set "
                               "model.vision.parallel_mode=split")
            inter = getattr(model.projector, "intermediate_size", None)
            if inter is not None and inter % tp:
                out.append(f"parallel.tp={tp} does not divide the projector's intermediate size "
                           f"{model.projector.intermediate_size}")
        # --- sequence alignment (SPEC §11): SP shards S over tp; CP cuts each document
        seq_mult, doc_mult = self.sequence_multiple, self.document_multiple
        if seq_length % seq_mult:
            out.append(f"data.seq_length={seq_length} must be a multiple of 2*cp*tp={seq_mult} "
                       "(sequence/context parallelism shard the packed sequence evenly)")
        if pad_to_multiple % doc_mult:
            out.append(f"data.pad_to_multiple={pad_to_multiple} must be a multiple of "
                       f"{doc_mult} (2*cp{'*tp' if self.sequence_parallel else ''}): context "
                       "parallelism cuts every document into 2*cp load-balanced chunks; set "
                       f"data.pad_to_multiple={doc_mult}")
        return out

    def check_model(self, model: ModelConfig, *, seq_length: int, pad_to_multiple: int) -> None:
        """Raise ``ValueError`` listing every :meth:`layout_problems` (the first one first)."""
        problems = self.layout_problems(model, seq_length=seq_length,
                                        pad_to_multiple=pad_to_multiple)
        if problems:
            raise ValueError("; ".join(problems))

    def data_parallel_size(self, world_size: int) -> int:
        """dp for ``world_size`` ranks, with a clear error when the layout does not divide it."""
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp={model}; "
                f"launch a multiple of {model} ranks or change the layout"
            )
        dp = world_size // model
        # megatron folds experts over the same ranks: ep x etp x expert-dp = tp x cp x dp.
        if (dp * self.cp * self.tp) % (self.ep * self.expert_tp):
            raise ValueError(
                f"ep={self.ep} x etp={self.expert_tp} must divide dp*cp*tp={dp * self.cp * self.tp}"
                f" (world size {world_size} / pp={self.pp}); change ep/etp or the world size"
            )
        return dp
