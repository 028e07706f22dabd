"""Pipeline stage planner: split the decoder layers over ``pp x vpp`` stages so that the slowest
stage -- counting the vision tower and projector on the first stage and the output head on the
last -- is as fast as possible, and say what megatron-core should be told.

The result is a :class:`StagePlan`: layers per virtual stage in layer order, training FLOPs per
stage and per pipeline rank, and the split in megatron-core's terms
(``pipeline_model_parallel_layout`` always; ``num_layers_in_first/last_pipeline_stage`` when the
middle stages are even and there is no virtual pipeline). Megatron numbers virtual stage ``k`` (in
layer order) as pipeline rank ``k % pp``, virtual stage ``k // pp``.

Balancing: a contiguous partition minimising the largest stage cost (exact dynamic program), and
among those the smallest sum of squared stage costs (so slack spreads evenly). Only the first and
the last virtual stage may hold no decoder layer (they still hold the ViT + embedding, or the head
and loss); an empty middle stage is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.families import family_costs
from megatron_vlm.planning.costs import (
    VisionBudget,
    llm_head_flops,
    llm_layer_flops,
)


class StagePlanError(ValueError):
    """An impossible or ill-formed pipeline split; ``reasons`` lists every problem found."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class StageCosts:
    """Per-unit training FLOPs of one micro-batch, in pipeline order."""

    layers: tuple[float, ...]
    """Decoder layer ``i`` (attention + MLP)."""
    layer_kinds: tuple[str, ...]
    """``dense`` or ``moe`` per layer."""
    first: dict[str, float]
    """Work only the first stage does: ``vision`` (ViT + patch embedding), ``projector``."""
    last: dict[str, float]
    """Work only the last stage does: ``head`` (output layer logits)."""

    @classmethod
    def of(cls, model: ModelConfig, seq_length: int, vision_budget: VisionBudget | None = None,
           tp: int = 1) -> StageCosts:
        """Costs of ``model`` at ``seq_length`` LLM tokens and ``vision_budget`` ViT patches per
        micro-batch (``tp`` only pads the vocabulary as megatron does)."""
        llm = model.llm
        layers, kinds = [], []
        for i in range(llm.num_layers):
            parts = llm_layer_flops(llm, i, seq_length)
            layers.append(parts["attention"] + parts["mlp"])
            kinds.append("moe" if llm.moe_layer_freq[i] else "dense")
        first: dict[str, float] = {}
        if model.is_vlm:
            if vision_budget is None:
                raise ValueError("a VLM needs a vision budget (VisionBudget.from_job)")
            v = family_costs(model.family).vision_flops(model.vision, model.projector,
                                                        vision_budget)
            first = {"vision": v["patch_embed"] + v["vit_linear"] + v["vit_attention"],
                     "projector": v["projector"]}
        return cls(tuple(layers), tuple(kinds), first,
                   {"head": llm_head_flops(llm, seq_length, tp)})

    @property
    def first_total(self) -> float:
        return sum(self.first.values())

    @property
    def last_total(self) -> float:
        return sum(self.last.values())

    @property
    def total(self) -> float:
        return sum(self.layers) + self.first_total + self.last_total


@dataclass(frozen=True)
class Stage:
    """One virtual pipeline stage."""

    index: int
    """Position in layer order (0 = holds the embedding and ViT)."""
    pp_rank: int
    vp_stage: int
    layers: tuple[int, ...]
    """Decoder layers (0-based, global numbering)."""
    flops: float
    """Training FLOPs per micro-batch (whole model-parallel group)."""
    contents: tuple[str, ...]
    """``vision``, ``projector``, ``embedding``, ``dense``/``moe`` layer counts, ``head``."""


@dataclass(frozen=True)
class StagePlan:
    """A pipeline split and its cost."""

    pp: int
    vpp: int | None
    stages: tuple[Stage, ...]
    costs: StageCosts = field(repr=False)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        """Decoder layers per virtual stage, in layer order."""
        return tuple(len(s.layers) for s in self.stages)

    @property
    def rank_flops(self) -> tuple[float, ...]:
        """Training FLOPs per micro-batch of each pipeline rank (all its virtual stages)."""
        out = [0.0] * self.pp
        for s in self.stages:
            out[s.pp_rank] += s.flops
        return tuple(out)

    @property
    def max_stage_flops(self) -> float:
        return max(s.flops for s in self.stages)

    @property
    def imbalance(self) -> float:
        """Slowest stage / mean stage (1.0 = perfectly balanced)."""
        mean = sum(s.flops for s in self.stages) / len(self.stages)
        return self.max_stage_flops / mean if mean else 1.0

    def layout(self) -> str:
        """megatron-core's ``pipeline_model_parallel_layout`` string for this split
        (``E`` embedding, ``t`` decoder layer, ``L`` loss, ``|`` between virtual stages)."""
        parts = []
        for s in self.stages:
            n = len(s.layers)
            body = "t" * n if n <= 2 else f"t*{n}"
            if s.index == 0:
                body = "E" + ("," + body if n > 2 else body)
            if s.index == len(self.stages) - 1:
                body = body + ("," if n > 2 else "") + "L"
            parts.append(body)
        return "|".join(parts)

    def first_last(self) -> tuple[int, int] | None:
        """``(num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage)`` when
        megatron's uneven-split arguments can express this plan (no virtual pipeline, both >= 1,
        middle stages equal), else None (use :meth:`layout`)."""
        counts = self.layers_per_stage
        if self.vpp is not None or self.pp < 2 or min(counts[0], counts[-1]) < 1:
            return None
        if len(set(counts[1:-1])) > 1:
            return None
        return counts[0], counts[-1]

    def describe(self) -> str:
        """A table of the split: one row per virtual stage, FLOPs relative to the slowest."""
        top = self.max_stage_flops
        rows = [(f"{'stage':>5} {'pp':>3} {'vp':>3} {'layers':>9} {'GFLOP/mb':>12} "
                 f"{'load':>6}  contents")]
        for s in self.stages:
            span = f"{s.layers[0]}-{s.layers[-1]}" if s.layers else "-"
            rows.append(f"{s.index:>5} {s.pp_rank:>3} {s.vp_stage:>3} {span:>9} "
                        f"{s.flops / 1e9:>12.1f} {s.flops / top:>6.2f}  {', '.join(s.contents)}")
        rows.append(f"imbalance (max/mean) {self.imbalance:.3f}; layout '{self.layout()}'")
        return "\n".join(rows)


def _stage_costs(costs: StageCosts, counts: Sequence[int]) -> list[float]:
    out, start, k_last = [], 0, len(counts) - 1
    for k, n in enumerate(counts):
        c = sum(costs.layers[start:start + n])
        c += costs.first_total if k == 0 else 0.0
        c += costs.last_total if k == k_last else 0.0
        out.append(c)
        start += n
    return out


def _check(counts: Sequence[int], num_layers: int, num_stages: int) -> list[str]:
    reasons = []
    if len(counts) != num_stages:
        reasons.append(f"{len(counts)} stage sizes given for pp x vpp = {num_stages} stages")
    if any(n < 0 for n in counts):
        reasons.append(f"negative layer count in {list(counts)}")
    if sum(counts) != num_layers:
        reasons.append(f"stage sizes {list(counts)} sum to {sum(counts)}, the model has "
                       f"{num_layers} layers")
    empty = [k for k, n in enumerate(counts) if n == 0 and 0 < k < len(counts) - 1]
    if empty:
        reasons.append(f"middle stage(s) {empty} hold no decoder layer")
    return reasons


def _balance(costs: StageCosts, num_stages: int) -> list[int]:
    """Contiguous partition of the layers minimising (max stage cost, sum of squares)."""
    n = len(costs.layers)
    prefix = [0.0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def cost(k: int, i: int, j: int) -> float:  # stage k holds layers [i, j)
        c = prefix[j] - prefix[i]
        c += costs.first_total if k == 0 else 0.0
        c += costs.last_total if k == num_stages - 1 else 0.0
        return c

    def min_size(k: int) -> int:
        return 0 if k in (0, num_stages - 1) else 1

    def solve(key, combine):
        """DP over (stages placed, layers used): ``key`` maps a stage cost to its value (None =
        not allowed), ``combine`` folds values (``max`` or ``+``)."""
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
        arg = [[-1] * (n + 1) for _ in range(num_stages + 1)]
        best[0][0] = 0.0
        for k in range(num_stages):
            lo = min_size(k)
            for i in range(n + 1):
                if best[k][i] == inf:
                    continue
                for j in range(i + lo, n + 1):
                    v = key(cost(k, i, j))
                    if v is None:
                        break  # costs only grow with j
                    total = combine(best[k][i], v)
                    if total < best[k + 1][j]:
                        best[k + 1][j], arg[k + 1][j] = total, i
        if best[num_stages][n] == inf:
            return None, None
        counts, j = [], n
        for k in range(num_stages, 0, -1):
            i = arg[k][j]
            counts.append(j - i)
            j = i
        return best[num_stages][n], counts[::-1]

    bound, _ = solve(lambda c: c, max)
    tol = bound * 1e-12
    _, counts = solve(lambda c: None if c > bound + tol else c * c, lambda a, b: a + b)
    return counts


def plan_stages(
    model: ModelConfig,
    seq_length: int,
    pp: int,
    vpp: int | None = None,
    vision_budget: VisionBudget | None = None,
    layers_per_stage: Sequence[int] | None = None,
    tp: int = 1,
) -> StagePlan:
    """Balanced (or the given) split of ``model``'s decoder layers over ``pp x vpp`` stages.

    Args:
        model: the model (a VLM puts its ViT + projector on the first stage).
        seq_length: LLM tokens per micro-batch.
        pp: pipeline-parallel size.
        vpp: virtual stages per pipeline rank (interleaved schedule), or None.
        vision_budget: ViT patches per micro-batch (required for a VLM).
        layers_per_stage: a split to cost instead of balancing (layer order, ``pp x vpp``
            entries).
        tp: tensor-parallel size (pads the vocabulary of the head as megatron does).

    Raises:
        StagePlanError: the split is impossible (too few layers for the stages, wrong sizes,
            an empty middle stage, vpp without pp), with every reason.
    """
    reasons = []
    if pp < 1:
        reasons.append(f"pp={pp} must be >= 1")
    if vpp is not None and (vpp < 2 or pp < 2):
        reasons.append(f"vpp={vpp} needs vpp >= 2 and pp >= 2 (or vpp=None)")
    if reasons:
        raise StagePlanError(reasons)
    num_layers = model.llm.num_layers
    num_stages = pp * (vpp or 1)
    if num_stages > 1 and num_layers < num_stages - 2:
        raise StagePlanError([
            (f"pp x vpp = {num_stages} stages need at least {num_stages - 2} decoder layers "
             f"(one per middle stage); the model has {num_layers}")])
    costs = StageCosts.of(model, seq_length, vision_budget, tp)
    if layers_per_stage is not None:
        bad = _check(layers_per_stage, num_layers, num_stages)
        if bad:
            raise StagePlanError(bad)
        counts = list(layers_per_stage)
    else:
        counts = _balance(costs, num_stages)
    flops = _stage_costs(costs, counts)
    stages, start = [], 0
    for k, n in enumerate(counts):
        layers = tuple(range(start, start + n))
        start += n
        contents = []
        if k == 0:
            contents += (["vision", "projector"] if costs.first else []) + ["embedding"]
        kinds = [costs.layer_kinds[i] for i in layers]
        for kind in ("dense", "moe"):
            if kinds.count(kind):
                contents.append(f"{kinds.count(kind)} {kind}")
        if k == num_stages - 1:
            contents.append("head")
        stages.append(Stage(index=k, pp_rank=k % pp, vp_stage=k // pp, layers=layers,
                            flops=flops[k], contents=tuple(contents)))
    return StagePlan(pp=pp, vpp=vpp, stages=tuple(stages), costs=costs)
