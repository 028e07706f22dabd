"""Cluster operations: SLURM batch scripts (srun + torchrun rendezvous, preemption through a stop
file, requeue, job arrays for sweeps) and the checks a launch passes before anything is queued
(``preflight``: world size vs layout, the planner's memory fit). Imports nothing heavy: rendering
a script needs no torch."""

from megatron_vlm.cluster.slurm import SlurmJob, read_array_file, render_sbatch, submit

__all__ = ["SlurmJob", "read_array_file", "render_sbatch", "submit"]
