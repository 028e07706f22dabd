"""Which parameters Muon optimises, how each is cut into matrices, and per-module LR multipliers.

Rules (SPEC §2 MuonClip; Moonlight ``examples/toy_train.py``):

* **Muon**: every trainable 2-D hidden matrix -- attention projections (MLA ``linear_q_proj``,
  ``linear_q_down_proj``, ``linear_q_up_proj``, ``linear_kv_down_proj``, ``linear_kv_up_proj``,
  ``linear_proj``; a fused ``linear_qkv``), MLP and expert ``linear_fc1``/``linear_fc2`` (and
  GroupedMLP ``weight1``/``weight2``), and the **MoE router weight** ``[experts, hidden]``.
  Moonlight's rule is "``ndim >= 2`` and not ``embed_tokens``/``lm_head``", which sends the
  router (``mlp.gate.weight`` in HF) to Muon; megatron-core's own
  ``get_megatron_muon_optimizer`` does the same (2-D, not embedding/output). Set
  ``router_in_muon=False`` to send it to AdamW instead.
* **AdamW**: embeddings, the output head (megatron marks both ``is_embedding_or_output_parameter``),
  position tables, every 1-D parameter (RMSNorm/LayerNorm weights, biases; TE's fused
  ``layer_norm_weight``) and any parameter that is not 2-D (a patch-embedding conv). 1-D
  parameters get no weight decay (``wd_mult = 0``), as the project's AdamW builder and megatron's
  default groups do; Moonlight decays them too -- a deliberate difference.
* **No optimizer**: the router's ``expert_bias`` is a buffer with its own sign-rule update; it never
  appears in ``named_parameters`` (checked by the tests). Frozen parameters (``requires_grad``
  False, e.g. the ViT in a projector-only stage) are left out.

Blocks (:func:`muon_layout`) follow the Hugging Face tensors, so Muon sees the matrices a
checkpoint names: ``linear_fc1 = [gate; up]`` -> gate and up; every expert alone (SequentialMLP
keeps per-expert parameters already; TEGroupedMLP's ``weight{e}`` likewise; legacy GroupedMLP's
fused ``weight1 [hidden, E * 2F]`` is megatron's ``view(E, hidden, 2F)``, ``weight2 [E * F,
hidden]`` is ``view(E, F, hidden)``); a fused ``linear_qkv`` (per query group ``[q_g; k_g; v_g]``)
-> q, k, v; MLA's ``linear_q_up_proj`` / ``linear_kv_up_proj`` are HF's ``q_b_proj`` /
``kv_b_proj`` as whole matrices. Orthogonalisation commutes with row permutations, so HF's
rope-interleave row order needs no care; it does not commute with splitting, hence the blocks.

Blocks assume whole matrices: a tensor-parallel shard (TP > 1) is refused unless the caller says
it will gather the shards (``gathered=True``, the distributed Muon): the layout then describes
the matrix that ``torch.cat`` of the shards along ``partition_dim`` gives, which for a gated
``linear_fc1`` is ``[gate_0; up_0; gate_1; up_1; ...]`` (each rank holds its rows of gate and of
up), i.e. gate = part 0 of every rank's group stacked, up = part 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_vlm.optim.muon import WHOLE, BlockLayout

_FC1 = re.compile(r"(^|\.)linear_fc1\.weight\d*$")  # dense, shared, SequentialMLP, TEGroupedMLP
_FC2 = re.compile(r"(^|\.)linear_fc2\.weight\d*$")
_GROUPED_FC1 = re.compile(r"(^|\.)experts\.weight1$")  # legacy GroupedMLP
_GROUPED_FC2 = re.compile(r"(^|\.)experts\.weight2$")
_QKV = re.compile(r"(^|\.)linear_qkv\.weight$")
_ROUTER = re.compile(r"(^|\.)router\.weight$")
_EMBEDDING_NAMES = ("word_embeddings", "position_embeddings", "pos_emb", "output_layer",
                    "embed_tokens", "lm_head")


def named_parameters_with_config(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, object]]:
    """``(name, param, config)`` for every parameter; ``config`` is the megatron
    ``TransformerConfig`` of the nearest enclosing module that has one (None if none does), so
    the ViT's and the LLM's parameters each see their own head counts and FFN sizes."""

    def walk(module: nn.Module, prefix: str, config) -> Iterator[tuple[str, nn.Parameter, object]]:
        config = getattr(module, "config", None) or config
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param, config
        for child_name, child in module.named_children():
            yield from walk(child, f"{prefix}{child_name}.", config)

    yield from walk(model, "", None)


def is_embedding_or_output(name: str, param: torch.Tensor) -> bool:
    """Embedding tables and the output head (AdamW)."""
    if getattr(param, "is_embedding_or_output_parameter", False):
        return True
    return any(part in name for part in _EMBEDDING_NAMES)


def uses_muon(name: str, param: torch.Tensor, *, router_in_muon: bool = True) -> bool:
    """True for 2-D hidden matrices (see the module docstring for the rules)."""
    if param.ndim != 2 or is_embedding_or_output(name, param):
        return False
    return router_in_muon or not _ROUTER.search(name)


def _is_routed_expert(name: str) -> bool:
    return ".experts." in f".{name}" and "shared_experts" not in name


def _tp_size(name: str, param: torch.Tensor, config) -> int:
    """Ranks ``param`` is sharded over (1 = whole)."""
    if config is None or not getattr(param, "tensor_model_parallel", False):
        return 1
    tp = (config.expert_tensor_parallel_size if _is_routed_expert(name)
          else config.tensor_model_parallel_size)
    return tp or 1


def _need(config, name: str, field_name: str):
    value = None if config is None else getattr(config, field_name, None)
    if value is None:
        raise ValueError(
            f"muon_layout: {name} is a fused megatron tensor; splitting it needs "
            f"config.{field_name} (pass the module's TransformerConfig)"
        )
    return value


def muon_layout(name: str, param: torch.Tensor, config=None, *,
                gathered: bool = False) -> BlockLayout:
    """The block layout for megatron parameter ``name`` (``param`` a whole 2-D matrix).

    Args:
        name: megatron parameter name (any prefix; the ending decides).
        param: the parameter (or any tensor of its shape and TP attributes).
        config: the owning module's megatron ``TransformerConfig``; needed for fused tensors
            (gated FFN, GroupedMLP expert count, qkv head layout) and TP sizes.
        gathered: ``param`` may be a TP shard that the optimizer all-gathers along
            ``partition_dim`` before orthogonalising; the layout is that gathered matrix's.

    Returns:
        A :class:`BlockLayout`; ``WHOLE`` for matrices HF keeps as they are.
    """
    if param.ndim != 2:
        raise ValueError(f"muon_layout: {name} has shape {tuple(param.shape)}, Muon needs 2-D")
    tp = _tp_size(name, param, config)
    if tp > 1 and not gathered:
        raise NotImplementedError(
            f"Muon orthogonalises whole matrices; {name} is a tensor-parallel shard (tp={tp}). "
            "Gather the shards first (distributed Muon) or run with tp=1"
        )
    shape = list(param.shape)
    if tp > 1:
        shape[param.partition_dim] *= tp
    rows, cols = shape
    if _FC1.search(name):
        if not _need(config, name, "gated_linear_unit"):
            return WHOLE
        if rows % (2 * tp):
            raise ValueError(f"muon_layout: gated {name} has {rows} rows, not a multiple of 2*tp")
        if tp > 1:
            if param.partition_dim != 0:
                raise NotImplementedError(f"muon_layout: {name} sharded along columns")
            # Shard r is [gate_r; up_r]: gate = part 0 of every shard, up = part 1.
            half = rows // (2 * tp)
            return BlockLayout(num_groups=tp, group_shape=(2 * half, cols), split_dim=0,
                               split_sizes=(half, half), per_group=False)
        return BlockLayout(split_dim=0, split_sizes=(rows // 2, rows // 2))  # [gate; up]
    if (_GROUPED_FC1.search(name) or _GROUPED_FC2.search(name)) and tp > 1:
        raise NotImplementedError(
            f"muon_layout: legacy GroupedMLP {name} under expert TP={tp} is not supported; use "
            "SequentialMLP/TEGroupedMLP experts or expert_tensor_parallel_size=1")
    if _GROUPED_FC1.search(name):
        ffn = _need(config, name, "moe_ffn_hidden_size")
        gated = bool(getattr(config, "gated_linear_unit", False))
        out = 2 * ffn if gated else ffn
        return BlockLayout(num_groups=cols // out, group_shape=(rows, out), split_dim=1,
                           split_sizes=(ffn, ffn) if gated else ())
    if _GROUPED_FC2.search(name):
        ffn = _need(config, name, "moe_ffn_hidden_size")
        return BlockLayout(num_groups=rows // ffn, group_shape=(ffn, cols))
    if _QKV.search(name):
        # Shards hold whole query groups [q_g; k_g; v_g]: the gathered matrix has them all.
        heads = _need(config, name, "num_attention_heads")
        groups = getattr(config, "num_query_groups", None) or heads
        head_dim = (getattr(config, "kv_channels", None)
                    or _need(config, name, "hidden_size") // heads)
        q = heads // groups * head_dim
        sizes = (q, head_dim, head_dim)
        if getattr(config, "attention_output_gate", False):
            sizes = (q, q, head_dim, head_dim)  # q, gate, k, v
        return BlockLayout(num_groups=groups, group_shape=(sum(sizes), cols), split_dim=0,
                           split_sizes=sizes, per_group=False)
    return WHOLE


def orthogonal_blocks(name: str, tensor: torch.Tensor, config=None) -> list[torch.Tensor]:
    """The views of ``tensor`` Muon orthogonalises separately (2-D, or 3-D
    ``[groups, rows, cols]`` for stacked q/k/v blocks -- flatten the first two dims)."""
    return muon_layout(name, tensor, config).views(tensor)


def prefix_lr_mult(mults: Mapping[str, float], default: float = 1.0) -> Callable[[str], float]:
    """An ``lr_mult`` hook: the multiplier of the longest prefix of the parameter name in
    ``mults`` (e.g. ``{"vision_model.": 0.1}``), else ``default``."""
    ordered = sorted(mults.items(), key=lambda kv: -len(kv[0]))

    def lr_mult(name: str) -> float:
        for prefix, mult in ordered:
            if name.startswith(prefix):
                return mult
        return default

    return lr_mult


@dataclass
class ParamGroups:
    """Torch param-group dicts for the two optimizers (megatron scheduler keys included)."""

    muon: list[dict] = field(default_factory=list)
    """Groups for :class:`megatron_vlm.optim.muon.Muon` (each carries ``muon_layout`` unless
    the layouts were put on the parameters)."""
    adamw: list[dict] = field(default_factory=list)
    """Groups for AdamW."""


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    min_lr: float,
    weight_decay: float,
    lr_mult: Callable[[str], float] | None = None,
    router_in_muon: bool = True,
    gathered: bool = False,
    layouts_on_params: bool = False,
) -> ParamGroups:
    """Split ``model``'s trainable parameters into Muon and AdamW param groups.

    Parameters sharing (optimizer, block layout, lr multiplier, weight-decay multiplier,
    expert-parallel) share a group. Each group carries ``params``, ``param_names``, ``lr``,
    ``max_lr``/``min_lr`` (read per group by megatron's ``OptimizerParamScheduler``, already
    multiplied by the group's ``lr_mult``), ``weight_decay`` and ``wd_mult`` (the scheduler sets
    ``weight_decay = wd * wd_mult``), ``is_expert_parallel`` (megatron's ``allreduce=False``
    marker), ``is_decoupled_lr``/``default_config`` (megatron's group-identity and logging
    keys) and, for Muon, ``muon_layout`` (a :meth:`BlockLayout.to_tuple`).

    With ``layouts_on_params`` (what the megatron optimizer builder uses) each Muon parameter
    gets its layout as a ``muon_layout`` attribute instead and groups carry neither
    ``muon_layout`` nor ``param_names``: one group per (optimizer, lr_mult, wd_mult,
    expert-parallel), which is exactly megatron's group identity
    (``optimizer.param_group_identifier_keys``) -- on load megatron matches saved groups to live
    ones by that identity, so two live groups sharing it would receive one saved group -- and
    nothing per parameter is stored in groups that the layer-wise optimizer re-slices per rank.

    Args:
        model: a model chunk (megatron ``GPTModel``, the VLM, or a DDP wrapper of one).
        lr / min_lr: peak and final learning rates before multipliers.
        weight_decay: decoupled weight decay for decayed parameters.
        lr_mult: per-parameter-name LR multiplier hook (see :func:`prefix_lr_mult`).
        router_in_muon: MoE router weight to Muon (Moonlight's rule) or to AdamW.
        gathered: TP shards are gathered by the optimizer (:func:`muon_layout`).
        layouts_on_params: see above.
    """
    groups: dict[tuple, dict] = {}
    for name, param, config in named_parameters_with_config(model):
        if not param.requires_grad:
            continue
        mult = 1.0 if lr_mult is None else float(lr_mult(name))
        expert_parallel = not getattr(param, "allreduce", True)
        if uses_muon(name, param, router_in_muon=router_in_muon):
            layout = muon_layout(name, param, config, gathered=gathered).to_tuple()
            kind, wd_mult = "muon", 1.0
            if layouts_on_params:
                param.muon_layout = layout
                layout = None
        else:
            layout = None
            no_decay = param.ndim < 2 or name.endswith(".bias")
            kind, wd_mult = "adamw", 0.0 if no_decay else 1.0
        key = (kind, layout, mult, wd_mult, expert_parallel)
        if key not in groups:
            group = {"params": [], "lr": lr * mult, "max_lr": lr * mult,
                     "min_lr": min_lr * mult, "lr_mult": mult,
                     "weight_decay": weight_decay * wd_mult, "wd_mult": wd_mult,
                     "is_expert_parallel": expert_parallel, "is_decoupled_lr": False,
                     "default_config": mult == 1.0}
            if not layouts_on_params:
                group["param_names"] = []
                if kind == "muon":
                    group["muon_layout"] = layout
            groups[key] = group
        groups[key]["params"].append(param)
        if not layouts_on_params:
            groups[key]["param_names"].append(name)
    out = ParamGroups()
    for (kind, *_), group in groups.items():
        (out.muon if kind == "muon" else out.adamw).append(group)
    return out
