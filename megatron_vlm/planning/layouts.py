"""Candidate parallel layouts for a job on N GPUs: which fit in GPU memory, and how fast each is.

For a layout ``(tp, pp, vpp, cp, ep, etp)`` with ``dp = N / (tp pp cp)``:

1. **Structure**: megatron's divisibility rules (heads, FFN widths, experts, the expert grid
   ``ep etp | dp cp tp``), TP inside a node, the sequence alignment ``2 cp tp`` (SPEC §11), the
   global batch over DP, the interleaved schedule's ``micro-batches % pp == 0``, and the stage
   planner (``stages.py``; the ViT + projector on stage 0). Each failure is a reason.
2. **Memory per pipeline rank**: parameters, gradients, optimizer state (``memory.py``) plus
   activations (``activations.py``) times the micro-batches the schedule keeps in flight:
   ``pp - r`` on rank ``r`` for 1F1B; with ``vpp`` chunks megatron runs
   ``2 (pp - r - 1) + (vpp - 1) pp`` warm-up chunk-forwards before the first backward
   (``schedules.py:get_pp_rank_microbatches``), each chunk counted as it is scheduled. The head's
   logits are alive for one micro-batch. A layout fits when the busiest rank stays under
   ``gpu_memory_gib - reserved_gib`` (the reserve stands for the CUDA context, NCCL buffers and
   allocator fragmentation).
3. **Step time**: per micro-batch, rank ``r`` computes its stages' FLOPs / (tp cp) (the ViT's work
   is split over TP x CP too) at ``efficiency x peak``, recompute adding its extra forward; the
   step takes ``m T_rank,max + (pp - 1) T_stage,max`` (1F1B / interleaved bubble) plus the
   exposed part of TP (sequence-parallel all-gather / reduce-scatter, 8 per layer), CP (ring
   exchange of K and V, 3x the forward volume with the backward), EP (all-to-all dispatch +
   combine, forward and backward) and expert-TP (all-gather + reduce-scatter of the routed
   tokens) traffic at the stated bandwidths -- NVLink inside a node, the
   per-GPU network link across nodes (megatron's rank order tp-cp-ep-dp-pp; experts
   etp-ep-dp-pp). DP gradient reduction and pipeline sends are assumed hidden. MFU counts model
   FLOPs without recompute.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.model import ModelConfig
from megatron_vlm.families import family_costs
from megatron_vlm.planning.activations import head_bytes, llm_layer_bytes
from megatron_vlm.planning.costs import VisionBudget
from megatron_vlm.planning.memory import OptimizerName, Sharding, TensorTable, static_memory
from megatron_vlm.planning.stages import StagePlan, StagePlanError, plan_stages
from megatron_vlm.planning.tensors import chunk_tensors, llm_layer_tensors, vision_parallel_mode

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One parallel layout; ``dp`` is derived from the GPU count."""

    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int
    dp: int
    split: tuple[int, ...] | None = None
    """Decoder layers per virtual stage (layer order); None = let the stage planner balance."""

    @classmethod
    def of(cls, parallel, num_gpus: int, split: tuple[int, ...] | None = None) -> Layout:
        """The layout of a ``ParallelConfig`` on ``num_gpus`` GPUs (dp derived; no checks)."""
        model_parallel = parallel.tp * parallel.pp * parallel.cp
        etp = parallel.etp if parallel.etp is not None else parallel.tp
        return cls(tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, cp=parallel.cp,
                   ep=parallel.ep, etp=etp, dp=max(num_gpus // model_parallel, 1), split=split)

    @property
    def label(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        return (f"tp{self.tp} pp{self.pp}{vpp} cp{self.cp} ep{self.ep} etp{self.etp} "
                f"dp{self.dp}")


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The GPU and network the estimate assumes (defaults: H100 SXM 80 GB, NDR InfiniBand)."""

    gpu_memory_gib: float = 80.0
    """Device memory."""
    reserved_gib: float = 6.0
    """Kept free for the CUDA context, NCCL buffers and allocator fragmentation."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    efficiency: float = 0.55
    """Fraction of peak the stage math reaches (SPEC §8: a bf16 GEMM reaches ~795/989 = 0.8;
    attention, norms and MoE permutation bring it down)."""
    gpus_per_node: int = 8
    nvlink_gbps: float = 350.0
    """Achieved GB/s per GPU for collectives inside a node (NVLink 4: 450 GB/s per direction)."""
    network_gbps: float = 40.0
    """Achieved GB/s per GPU across nodes (one 400 Gb/s NIC per GPU = 50 GB/s)."""
    comm_overlap: float = 0.5
    """Fraction of TP/EP traffic hidden behind compute (megatron's EP all-to-all overlap and
    communication/compute overlap of independent micro-batches)."""


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """What the planner needs from a job."""

    model: ModelConfig
    num_gpus: int
    seq_length: int
    global_batch_size: int
    """Packed sequences per optimizer step (micro-batch size 1)."""
    optimizer: OptimizerName = "adamw"
    sharding: Sharding = "flat"
    vision_budget: VisionBudget | None = None
    recompute: str = "none"
    """LLM activation recompute: ``none``, ``full`` or ``selective``."""
    recompute_modules: tuple[str, ...] = ("core_attn",)
    vision_recompute: str = "none"
    flash_attention: bool = True
    """A fused attention kernel (no softmax output kept); False for the unfused CPU kernels."""
    torch_grouped_experts: bool = False
    """Routed experts run as torch ``grouped_mm`` (no Transformer Engine): fc1 output kept
    instead of the SwiGLU intermediates, one stacked copy of a layer's expert weights alive while
    it runs (``activations.py``)."""
    router_in_muon: bool = True
    min_tokens_per_cp_rank: int = 2048
    """Context parallelism below this many tokens per CP rank is rejected: each rank's GEMMs get
    too thin and the ring exchange too frequent for CP to pay (it is for long sequences)."""
    hardware: Hardware = field(default_factory=Hardware)

    @classmethod
    def from_job(cls, job: JobConfig, num_gpus: int, **changes) -> PlanInputs:
        """The planner inputs of ``job`` on ``num_gpus`` GPUs (``changes`` override fields)."""
        optimizer = job.optim.optimizer
        sharding = ("none" if not job.parallel.use_distributed_optimizer
                    else "layerwise" if optimizer == "muon" else "flat")
        llm = job.model.llm
        values = {
            "model": job.model, "num_gpus": num_gpus, "seq_length": job.data.seq_length,
            "global_batch_size": job.data.global_batch_size, "optimizer": optimizer,
            "sharding": sharding, "vision_budget": VisionBudget.from_job(job),
            "recompute": llm.recompute, "recompute_modules": tuple(llm.recompute_modules),
            "vision_recompute": job.model.vision.recompute if job.model.is_vlm else "none",
            "router_in_muon": job.optim.muon_router}
        values.update(changes)
        return cls(**values)


@dataclass
class LayoutEstimate:
    """The planner's verdict on one layout."""

    layout: Layout
    reasons: list[str] = field(default_factory=list)
    """Why it cannot run (empty when it fits)."""
    stage_plan: StagePlan | None = None
    rank_memory: list[dict[str, float]] = field(default_factory=list)
    """Bytes per pipeline rank: params, grads, main_params, optimizer_state, activations,
    total."""
    step_time_s: float | None = None
    bubble_fraction: float | None = None
    comm_s: float | None = None
    mfu: float | None = None
    tokens_per_s_per_gpu: float | None = None

    @property
    def fits(self) -> bool:
        return not self.reasons

    @property
    def peak_memory(self) -> float:
        return max((m["total"] for m in self.rank_memory), default=0.0)

    def to_dict(self) -> dict:
        out = {"layout": {k: v for k, v in self.layout.__dict__.items() if k != "split"},
               "label": self.layout.label, "fits": self.fits,
               "reasons": self.reasons, "rank_memory_gib": [
                   {k: v / GIB for k, v in m.items()} for m in self.rank_memory],
               "step_time_s": self.step_time_s, "bubble_fraction": self.bubble_fraction,
               "exposed_comm_s": self.comm_s, "mfu": self.mfu,
               "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu}
        if self.stage_plan is not None:
            out["layers_per_stage"] = list(self.stage_plan.layers_per_stage)
            out["pipeline_layout"] = self.stage_plan.layout()
            out["stage_imbalance"] = self.stage_plan.imbalance
        return out


def _divides(a: int, b: int) -> bool:
    return b % a == 0


def structural_reasons(inputs: PlanInputs, lay: Layout) -> list[str]:
    """Every divisibility / placement rule ``lay`` breaks (empty = buildable)."""
    llm, model, hw = inputs.model.llm, inputs.model, inputs.hardware
    r = []
    if lay.tp * lay.pp * lay.cp * lay.dp != inputs.num_gpus:
        r.append(f"tp*pp*cp={lay.tp * lay.pp * lay.cp} does not divide {inputs.num_gpus} GPUs")
    if lay.tp > hw.gpus_per_node:
        r.append(f"tp={lay.tp} spans nodes ({hw.gpus_per_node} GPUs per node)")
    for what, size in (("num_attention_heads", llm.num_attention_heads),
                       ("num_query_groups", llm.query_groups),
                       ("ffn_hidden_size", llm.ffn_hidden_size)):
        if not _divides(lay.tp, size):
            r.append(f"tp={lay.tp} does not divide model.llm.{what}={size}")
    if model.is_vlm:
        checks = [("projector width", model.projector.intermediate_size)]
        if vision_parallel_mode(model.vision) == "tp":  # split mode keeps the ViT whole
            checks += [("vision heads", model.vision.num_attention_heads),
                       ("vision ffn", model.vision.ffn_hidden_size)]
        for what, size in checks:
            if not _divides(lay.tp, size):
                r.append(f"tp={lay.tp} does not divide the {what} {size}")
    if llm.num_experts is not None:
        if not _divides(lay.ep, llm.num_experts):
            r.append(f"ep={lay.ep} does not divide num_experts={llm.num_experts}")
        if not _divides(lay.etp, llm.moe_ffn_hidden_size):
            r.append(f"etp={lay.etp} does not divide moe_ffn_hidden_size")
        if (lay.dp * lay.cp * lay.tp) % (lay.ep * lay.etp):
            r.append(f"ep*etp={lay.ep * lay.etp} does not divide dp*cp*tp="
                     f"{lay.dp * lay.cp * lay.tp}")
    elif lay.ep > 1:
        r.append("ep > 1 needs an MoE model")
    align = 2 * lay.cp * lay.tp if (lay.cp > 1 or lay.tp > 1) else 1
    if inputs.seq_length % align:
        r.append(f"seq_length={inputs.seq_length} is not a multiple of 2*cp*tp={align}")
    if lay.cp > 1 and inputs.seq_length // lay.cp < inputs.min_tokens_per_cp_rank:
        r.append(f"cp={lay.cp} leaves {inputs.seq_length // lay.cp} tokens per CP rank "
                 f"(< {inputs.min_tokens_per_cp_rank}); CP is for long sequences")
    if inputs.global_batch_size % lay.dp:
        r.append(f"global batch {inputs.global_batch_size} is not divisible by dp={lay.dp}")
    else:
        m = inputs.global_batch_size // lay.dp
        if lay.vpp and m % lay.pp:
            r.append(f"interleaved schedule: {m} micro-batches per DP rank not a multiple of "
                     f"pp={lay.pp}")
    if inputs.optimizer == "muon" and inputs.sharding == "flat":
        r.append("Muon cannot use the flat DistributedOptimizer (Megatron-LM #2164)")
    return r


def in_flight(pp: int, vpp: int | None, rank: int, num_micro: int) -> list[int]:
    """Micro-batches whose activations each of ``rank``'s chunks holds at its peak."""
    if pp == 1:
        return [1]
    if vpp is None:
        return [min(num_micro, pp - rank)]
    total = num_micro * vpp
    forwards = min(total, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    counts = [0] * vpp
    for j in range(forwards):
        counts[(j // pp) % vpp] += 1
    return [min(c, num_micro) for c in counts]


def _stage_plan(inputs: PlanInputs, lay: Layout, cache: dict | None) -> StagePlan:
    key = ("stages", lay.pp, lay.vpp, lay.tp, lay.split)
    if cache is None or key not in cache:
        plan = plan_stages(inputs.model, inputs.seq_length, lay.pp, lay.vpp,
                           inputs.vision_budget, layers_per_stage=lay.split, tp=lay.tp)
        if cache is None:
            return plan
        cache[key] = plan
    return cache[key]


def _layer_bytes(inputs: PlanInputs, lay: Layout, layer: int) -> dict[str, float]:
    return llm_layer_bytes(inputs.model.llm, layer, tp=lay.tp, etp=lay.etp, cp=lay.cp,
                           seq_length=inputs.seq_length, recompute=inputs.recompute,
                           recompute_modules=inputs.recompute_modules,
                           flash=inputs.flash_attention, ep=lay.ep,
                           torch_grouped_experts=inputs.torch_grouped_experts)


def _signature(model: ModelConfig, stage, last_index: int) -> tuple:
    """What a stage's parameter bytes depend on (layer kinds, not their indices)."""
    freq = model.llm.moe_layer_freq
    moe = sum(freq[i] for i in stage.layers)
    return (len(stage.layers) - moe, moe, stage.index == 0, stage.index == last_index)


def _static(inputs: PlanInputs, lay: Layout, stages: list, last_index: int,
            cache: dict | None) -> dict[str, int]:
    model = inputs.model
    expert_dp = inputs.num_gpus // (lay.pp * lay.ep * lay.etp)
    key = ("static", tuple(_signature(model, s, last_index) for s in stages), lay.tp, lay.ep,
           lay.etp, lay.dp * lay.cp, expert_dp)
    if cache is not None and key in cache:
        return cache[key]
    chunks = [_chunk_table(model, s, last_index, lay, cache if cache is not None else {})
              for s in stages]
    out = static_memory(chunks, optimizer=inputs.optimizer, sharding=inputs.sharding,
                        dp=lay.dp * lay.cp, expert_dp=expert_dp,
                        router_in_muon=inputs.router_in_muon).as_dict()
    if cache is not None:
        cache[key] = out
    return out


def _chunk_table(model: ModelConfig, stage, last_index: int, lay: Layout,
                 cache: dict) -> TensorTable:
    """:class:`TensorTable` of a chunk, assembled in module order from per-layer-kind tables
    (the same arrays ``chunk_tensors`` gives, built once per layer kind instead of per layer)."""
    first, last = stage.index == 0, stage.index == last_index
    shard = (lay.tp, lay.ep, lay.etp)

    def cached(key, build):
        if key not in cache:
            cache[key] = build()
        return cache[key]

    ends = cached(("ends", first, last, shard), lambda: TensorTable.of(chunk_tensors(
        model, [], first=first, last=last, tp=lay.tp, ep=lay.ep, etp=lay.etp)))
    head = int(first)  # the embedding comes first, then the layers, then norm/head/ViT
    tables = [ends.select(np.arange(ends.numel.size) < head)]
    for i in stage.layers:
        kind = model.llm.moe_layer_freq[i]
        tables.append(cached(("layer", kind, shard), lambda i=i: TensorTable.of(
            llm_layer_tensors(model.llm, i, "", model.params_dtype, lay.tp, lay.ep, lay.etp,
                              not model.freeze_llm))))
    tables.append(ends.select(np.arange(ends.numel.size) >= head))
    return TensorTable.concat(tables)


def rank_memory(inputs: PlanInputs, lay: Layout, plan: StagePlan, rank: int,
                cache: dict | None = None) -> dict[str, float]:
    """Bytes on pipeline rank ``rank`` (the busiest DP rank's optimizer share)."""
    model = inputs.model
    stages = [s for s in plan.stages if s.pp_rank == rank]
    last_index = len(plan.stages) - 1
    static = _static(inputs, lay, stages, last_index, cache)
    num_micro = inputs.global_batch_size // lay.dp
    counts = in_flight(lay.pp, lay.vpp, rank, num_micro)
    per_kind = {kind: _layer_bytes(inputs, lay, i) for kind, i in _kind_examples(model).items()}
    act, peak_extra = 0.0, 0.0
    for stage, count in zip(stages, counts):
        chunk = 0.0
        for i in stage.layers:
            b = per_kind[model.llm.moe_layer_freq[i]]
            chunk += b["kept"]
            peak_extra = max(peak_extra, b["peak_extra"])
        if stage.index == 0 and model.is_vlm:
            chunk += family_costs(model.family).vision_bytes(
                model.vision, model.projector, inputs.vision_budget, tp=lay.tp, cp=lay.cp,
                recompute=inputs.vision_recompute, flash=inputs.flash_attention)
        act += count * chunk
        if stage.index == last_index:
            act += head_bytes(model.llm, tp=lay.tp, cp=lay.cp, seq_length=inputs.seq_length)
    out = {**static, "activations": act + peak_extra}
    out["total"] = static["total"] + out["activations"]
    return out


def _kind_examples(model: ModelConfig) -> dict[int, int]:
    """One layer index per layer kind (0 dense, 1 MoE): activations depend only on the kind."""
    out: dict[int, int] = {}
    for i, kind in enumerate(model.llm.moe_layer_freq):
        out.setdefault(kind, i)
    return out


def _comm_seconds(inputs: PlanInputs, lay: Layout, plan: StagePlan, rank: int) -> float:
    """Exposed TP, CP and EP communication of one micro-batch on ``rank``."""
    hw, llm = inputs.hardware, inputs.model.llm
    tokens = inputs.seq_length / lay.cp  # per CP rank, all TP ranks together
    layers = [i for s in plan.stages if s.pp_rank == rank for i in s.layers]
    seconds = 0.0
    if lay.tp > 1:  # 2 all-gathers + 2 reduce-scatters forward, as many backward, per layer
        per_layer = 8 * tokens * llm.hidden_size * 2 * (lay.tp - 1) / lay.tp
        seconds += len(layers) * per_layer / (hw.nvlink_gbps * 1e9)
    if lay.cp > 1:  # ring exchange of K and V: (cp-1) chunks forward, K, V, dK, dV backward
        if llm.attention == "gqa":  # K and V of the key/value heads only
            kv = 2 * llm.query_groups * llm.head_dim / lay.tp
        else:
            kv = llm.num_attention_heads * (llm.qk_head_dim + llm.v_head_dim) / lay.tp
        per_layer = 3 * (lay.cp - 1) * tokens * kv * 2
        bw = hw.nvlink_gbps if lay.tp * lay.cp <= hw.gpus_per_node else hw.network_gbps
        seconds += len(layers) * per_layer / (bw * 1e9)
    moe = [i for i in layers if llm.moe_layer_freq[i]]
    routed = tokens / lay.tp * llm.moe_router_topk * llm.hidden_size * 2  # bytes per GPU
    if moe and lay.ep > 1:  # all-to-all dispatch + combine, forward and backward
        per_layer = 4 * routed * (lay.ep - 1) / lay.ep
        intra = lay.ep * lay.etp <= hw.gpus_per_node  # megatron's expert grid: etp-ep-dp-pp
        bw = hw.nvlink_gbps if intra else hw.network_gbps
        seconds += len(moe) * per_layer / (bw * 1e9)
    if moe and lay.etp > 1:  # expert-TP all-gather + reduce-scatter of the routed tokens
        per_layer = 4 * routed * (lay.etp - 1)
        seconds += len(moe) * per_layer / (hw.nvlink_gbps * 1e9)
    return seconds * (1.0 - hw.comm_overlap)


def _recompute_factor(inputs: PlanInputs) -> float:
    return 4.0 / 3.0 if inputs.recompute == "full" else 1.0


def evaluate(inputs: PlanInputs, lay: Layout, cache: dict | None = None) -> LayoutEstimate:
    """Memory, fit and step time of ``lay`` (reasons filled when it cannot run); ``cache``
    keeps stage plans between calls for the same ``inputs``."""
    est = LayoutEstimate(layout=lay, reasons=structural_reasons(inputs, lay))
    if est.reasons:
        return est
    try:
        plan = _stage_plan(inputs, lay, cache)
    except StagePlanError as err:
        est.reasons = list(err.reasons)
        return est
    est.stage_plan = plan
    hw = inputs.hardware
    budget = (hw.gpu_memory_gib - hw.reserved_gib) * GIB
    est.rank_memory = [rank_memory(inputs, lay, plan, r, cache) for r in range(lay.pp)]
    for r, mem in enumerate(est.rank_memory):
        if mem["total"] > budget:
            parts = ", ".join(f"{k} {mem[k] / GIB:.1f}" for k in
                              ("params", "grads", "main_params", "optimizer_state",
                               "activations"))
            est.reasons.append(f"pp rank {r} needs {mem['total'] / GIB:.1f} GiB ({parts}) > "
                               f"{hw.gpu_memory_gib - hw.reserved_gib:.0f} GiB usable")
    # Step time (also for layouts that do not fit, to show what they would give).
    rate = hw.efficiency * hw.peak_tflops * 1e12
    split = lay.tp * lay.cp
    extra = _recompute_factor(inputs)
    first = plan.costs.first_total * (4.0 / 3.0 if inputs.vision_recompute == "full" else 1.0)

    def stage_time(s) -> float:
        llm_part = s.flops - (plan.costs.first_total if s.index == 0 else 0.0)
        vit_part = first if s.index == 0 else 0.0
        return (llm_part * extra + vit_part) / split / rate

    comm = [_comm_seconds(inputs, lay, plan, r) for r in range(lay.pp)]
    rank_time = [sum(stage_time(s) for s in plan.stages if s.pp_rank == r) + comm[r]
                 for r in range(lay.pp)]
    stage_max = max(stage_time(s) + comm[s.pp_rank] / (lay.vpp or 1) for s in plan.stages)
    m = inputs.global_batch_size // lay.dp
    step = m * max(rank_time) + (lay.pp - 1) * stage_max
    model_flops = inputs.global_batch_size * plan.costs.total
    est.step_time_s = step
    est.bubble_fraction = (lay.pp - 1) * stage_max / step
    est.comm_s = m * max(comm)
    est.mfu = model_flops / (step * inputs.num_gpus * hw.peak_tflops * 1e12)
    est.tokens_per_s_per_gpu = inputs.global_batch_size * inputs.seq_length / step / inputs.num_gpus
    return est


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def candidate_layouts(inputs: PlanInputs, max_pp: int = 64, max_cp: int = 16,
                      vpps: tuple[int | None, ...] = (None, 2, 4)) -> Iterator[Layout]:
    """Every (tp, pp, vpp, cp, ep, etp) over powers of two (ep: divisors of the expert count)
    whose model-parallel size divides the GPU count."""
    llm, n = inputs.model.llm, inputs.num_gpus
    eps = ([e for e in range(1, (llm.num_experts or 1) + 1)
            if (llm.num_experts or 1) % e == 0 and e <= n])
    for tp in _powers_of_two(min(n, inputs.hardware.gpus_per_node * 2)):
        for pp in _powers_of_two(min(n, max_pp, llm.num_layers)):
            for cp in _powers_of_two(min(n, max_cp)):
                if n % (tp * pp * cp):
                    continue
                dp = n // (tp * pp * cp)
                for vpp in vpps:
                    if vpp is not None and pp < 2:
                        continue
                    for ep in eps:
                        for etp in sorted({1, tp}):
                            yield Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, dp=dp)


def plan_layouts(inputs: PlanInputs, layouts: list[Layout] | None = None
                 ) -> list[LayoutEstimate]:
    """Evaluate ``layouts`` (default: :func:`candidate_layouts`); fitting ones first, fastest
    first, then the rest by peak memory."""
    cache: dict = {}
    estimates = [evaluate(inputs, lay, cache)
                 for lay in (layouts or list(candidate_layouts(inputs)))]
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: e.step_time_s)
    failing = sorted((e for e in estimates if not e.fits),
                     key=lambda e: (e.stage_plan is None, e.peak_memory))
    return fitting + failing
