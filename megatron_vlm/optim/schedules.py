"""Learning-rate schedules: megatron-core's OptimizerParamScheduler, configured from OptimConfig.

* ``cosine``: linear warmup, then cosine decay from ``lr`` to ``min_lr`` over the remaining steps.
* ``wsd``: warmup-stable-decay: linear warmup, constant ``lr``, and a final decay
  (``wsd_decay_fraction`` of the run) shaped ``wsd_decay_style``.
* ``constant``: linear warmup then constant.

On resume the schedule is this run's, not the checkpoint's: the checkpoint gives only the step
count (extending a 600-step WSD run to 1000 steps moves its decay to the new end). The
resume logs the old and new learning rate (``checkpoint/run_dir.py``, :func:`lr_at`).
"""

from __future__ import annotations

from types import SimpleNamespace

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_vlm.config.optim import OptimConfig


def build_scheduler(optim: OptimConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    """The scheduler steps once per optimizer step (``increment=1``)."""
    warmup = min(optim.warmup_steps, total_steps)
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[optim.schedule]
    wsd_steps = None
    if optim.schedule == "wsd":
        wsd_steps = max(1, round(optim.wsd_decay_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        # load_state_dict takes only num_steps from a checkpoint and keeps this run's schedule
        # (megatron's use_checkpoint_opt_param_scheduler=True would keep the old run's lr,
        # warmup and decay length silently, and its WSD decay length is not even saved).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=optim.wsd_decay_style if optim.schedule == "wsd" else None,
    )


def lr_at(optim: OptimConfig, total_steps: int, num_steps: int) -> float:
    """The schedule's base learning rate after ``num_steps`` scheduler steps (the lr of the next
    update; param-group multipliers not applied). No optimizer needed."""
    scheduler = build_scheduler(optim, SimpleNamespace(param_groups=[]), total_steps)
    scheduler.num_steps = num_steps
    return scheduler.get_lr({})
