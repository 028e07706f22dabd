"""Cluster operations: SLURM batch scripts (srun + torchrun rendezvous, preemption through a stop
file, requeue, job arrays for sweeps), the checks a launch passes before anything is queued
(``preflight``: world size vs layout, the planner's memory fit), and data preparation as a job
array plus a merge job (``prepare_array``). Imports nothing heavy: rendering a script needs no
torch."""

from megatron_vlm.cluster.prepare_array import (
    PrepareArrayJob,
    render_prepare_scripts,
    submit_prepare,
)
from megatron_vlm.cluster.slurm import SlurmJob, read_array_file, render_sbatch, submit

__all__ = ["PrepareArrayJob", "SlurmJob", "read_array_file", "render_prepare_scripts",
           "render_sbatch", "submit", "submit_prepare"]
