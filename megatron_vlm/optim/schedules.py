"""Learning-rate schedules: megatron-core's OptimizerParamScheduler, configured from OptimConfig.

* ``cosine``: linear warmup, then cosine decay from ``lr`` to ``min_lr`` over the remaining steps.
* ``wsd``: warmup-stable-decay: linear warmup, constant ``lr``, and a final decay
  (``wsd_decay_fraction`` of the run) shaped ``wsd_decay_style``.
* ``constant``: linear warmup then constant.
"""

from __future__ import annotations

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
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=optim.wsd_decay_style if optim.schedule == "wsd" else None,
    )
