"""megatron-core 0.16.1 optimizer wrappers, subclassed where MuonClip needs more of them.

* :class:`MixedFloat16Optimizer` -- ``Float16OptimizerWithFloat16Params`` whose
  ``sharded_state_dict`` also handles fp32 parameters inside a bf16 model. Megatron maps
  optimizer state ids to model tensors by enumerating ``float16_groups`` only
  (``optimizer.py:813``) and pairs each group's ids with its fp32 masters positionally
  (``:827``); both are wrong as soon as a group holds an fp32 parameter (our bf16 models keep
  norm weights in fp32), and saving fails with "Param id N does not match any model sharded
  param" -- for megatron's AdamW path as well. A group without bf16 parameters then also breaks
  loading (an empty master list, dropped structure, "Cannot merge two lists"): masters are
  stored per group index.
* :class:`LayerWiseMuonOptimizer` -- ``LayerWiseDistributedOptimizer`` (each DP rank owns whole
  parameters) built with :class:`MixedFloat16Optimizer` wrappers, an all-gather that groups
  parameters by dtype (megatron flattens all of a rank's parameters into one buffer of the first
  one's dtype, ``layer_wise_optimizer.py:152``), a ``sharded_state_dict`` that also handles
  ``FP32Optimizer`` members (megatron's reads ``sd["optimizer"]``, which only the Float16 wrapper
  has, ``:289``) and keeps each optimizer's common ``step`` even where rank 0 owns none of its
  parameters, and :meth:`~LayerWiseMuonOptimizer.sync_params` for QK-Clip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
    OptimizerConfig,
)
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_vlm.parallel import comm


class MixedFloat16Optimizer(Float16OptimizerWithFloat16Params):
    """bf16 params with fp32 masters, plus fp32 params, checkpointable (module docstring)."""

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False,
                           metadata: dict | None = None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        # The model tensor behind every optimizer param, in the optimizer's id order.
        model_of = {id(main): model
                    for models, mains in zip(self.float16_groups, self.fp32_from_float16_groups)
                    for model, main in zip(models, mains)}
        model_params = [model_of.get(id(p), p)
                        for g in self.optimizer.param_groups for p in g["params"]]
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, model_params)
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_map[pid], main, prefix="optimizer.state.fp32_param")
             for pid, main in zip(
                 [pid for pid, p in zip(state_group["params"], group["params"])
                  if id(p) in model_of],
                 mains)]
            for mains, state_group, group in zip(
                state_dict["fp32_from_fp16_params"], state_dict["optimizer"]["param_groups"],
                self.optimizer.param_groups)
        ]
        # dist-checkpointing drops list elements that are all sharded from the common state, so
        # a list with empty groups cannot be merged back on load (megatron's own layer-wise
        # optimizer works around it the same way, layer_wise_optimizer.py:276): index -> group.
        state_dict["fp32_from_fp16_params"] = {
            i: group if group else LocalNonpersistentObject(group)
            for i, group in enumerate(state_dict["fp32_from_fp16_params"])}
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], id_map, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict

    def load_state_dict(self, state_dict):
        groups = state_dict.get("fp32_from_fp16_params")
        if isinstance(groups, dict):
            state_dict["fp32_from_fp16_params"] = [v for _, v in sorted(groups.items())]
        super().load_state_dict(state_dict)


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, init_state_fn: Callable
) -> MegatronOptimizer:
    """megatron's wrapper for ``optimizer``: fp32 masters under bf16, else the fp32 one."""
    if config.bf16:
        return MixedFloat16Optimizer(optimizer, config, None, init_state_fn)
    return FP32Optimizer(optimizer, config, init_state_fn)


class LayerWiseMuonOptimizer(LayerWiseDistributedOptimizer):
    """Layer-wise DP sharding of whole parameters over raw torch optimizers (module docstring).

    Args:
        optimizers: torch optimizers over this rank's (unsharded) param groups; sharded here,
            then wrapped (bf16: fp32 masters of the owned parameters only).
        config: megatron optimizer config (bf16, clip_grad).
        pg_collection: process groups (``dp_cp``, ``expt_dp`` for the sharding).
        init_state_fn_list: per optimizer, the state allocation used before checkpoint loads.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], config: OptimizerConfig,
                 pg_collection: ProcessGroupCollection,
                 init_state_fn_list: list[Callable]) -> None:
        # megatron-core 0.16.1's __init__ minus its bf16 wrapping (plain Float16 wrappers).
        self.pg_collection = pg_collection
        self.shard_params(optimizers)
        wrapped = [wrap_optimizer(o, config, f) for o, f in zip(optimizers, init_state_fn_list)]
        ChainedOptimizer.__init__(self, wrapped)

    @torch.no_grad()
    def allgather_params(self) -> None:
        """Every rank receives the parameters the others own (one all-gather per dtype)."""
        for params_list, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                                   (self.expt_dp_params_list, self.pg_collection.expt_dp)):
            if not params_list:
                continue
            dtypes = sorted({p.dtype for params in params_list for p in params}, key=str)
            for dtype in dtypes:
                _allgather([[p for p in params if p.dtype == dtype] for params in params_list],
                           group, dtype)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        """Each parameter's state is saved by its owner (DP replica id 0 everywhere), as in
        megatron-core 0.16.1; param-group metadata comes from a rank that has parameters in the
        group, and each optimizer's common ``step`` from a rank that has state."""
        sharded = ChainedOptimizer.sharded_state_dict(self, model_sharded_state_dict, is_loading,
                                                      **kwargs)
        for sh_base in nested_values(sharded):
            if hasattr(sh_base, "replica_id"):
                rid = sh_base.replica_id
                sh_base.replica_id = 0 if isinstance(rid, int) else (*rid[:2], 0)
        per_optimizer = {1: sharded} if len(self.chained_optimizers) == 1 else sharded
        for sd in per_optimizer.values():
            # MixedFloat16Optimizer: {"optimizer": torch state, "fp32_from_fp16_params": {...}};
            # FP32Optimizer: the torch state itself.
            optim_sd = sd["optimizer"] if "fp32_from_fp16_params" in sd else sd
            steps = [None] * dist.get_world_size()
            comm.all_gather_object(steps, _as_float(optim_sd["state"].get("common_step")))
            step = next((s for s in steps if s is not None), None)
            if len(optim_sd["state"]) == 0 and step is None:
                optim_sd["state"] = LocalNonpersistentObject(optim_sd["state"])
            elif step is not None and "common_step" not in optim_sd["state"]:
                optim_sd["state"]["common_step"] = torch.tensor(step)
            for i, group in enumerate(optim_sd["param_groups"]):
                local_params = group.pop("params")
                group["params"] = bool(local_params.unwrap())
                groups = [None] * dist.get_world_size()
                comm.all_gather_object(groups, group)
                chosen = next((g for g in groups if g["params"]), group)
                chosen["params"] = local_params
                optim_sd["param_groups"][i] = chosen
        return sharded

    def _owners(self) -> dict[int, tuple[int, dist.ProcessGroup]]:
        owners: dict[int, tuple[int, dist.ProcessGroup]] = {}
        for lists, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                             (self.expt_dp_params_list, self.pg_collection.expt_dp)):
            for rank, params in enumerate(lists or []):
                for p in params:
                    owners[id(p)] = (rank, group)
        return owners

    def owner_of(self, param: nn.Parameter) -> int | None:
        """Group rank (DP x CP, or expert DP) that steps ``param``; None when unsharded."""
        owner = self._owners().get(id(param))
        return None if owner is None else owner[0]

    @torch.no_grad()
    def sync_params(self, params: list[nn.Parameter]) -> None:
        """Copy each of ``params`` from its owner to the other ranks of its DP group (QK-Clip
        rescales rows of the owner's fp32 master; the others hold no master).

        Collective over the DP groups: every rank must pass the same list (QK-Clip's rows
        depend only on all-reduced logits, so they do).
        """
        owners = self._owners()
        for p in params:
            if id(p) not in owners:
                continue  # unsharded: every rank updated its own copy
            rank, group = owners[id(p)]
            comm.broadcast(p.data, src=dist.get_global_rank(group, rank), group=group)


def _as_float(step) -> float | None:
    return None if step is None else float(step)


def _allgather(params_list: list[list[nn.Parameter]], group: dist.ProcessGroup,
               dtype: torch.dtype) -> None:
    """Rank r of ``group`` sends ``params_list[r]``; everyone copies in what others own."""
    rank = dist.get_rank(group)
    device = next(p.device for params in params_list for p in params)
    src = (_flatten_dense_tensors([p.data for p in params_list[rank]]) if params_list[rank]
           else torch.empty(0, device=device, dtype=dtype))
    outputs = [torch.empty(sum(p.numel() for p in params), device=device, dtype=dtype)
               for params in params_list]
    comm.all_gather(outputs, src, group=group)
    for r, (flat, params) in enumerate(zip(outputs, params_list)):
        if r == rank or not params:
            continue
        for got, p in zip(_unflatten_dense_tensors(flat, params), params):
            p.data.copy_(got)
