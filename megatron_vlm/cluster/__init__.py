"""Cluster operations: SLURM batch scripts (srun + torchrun rendezvous, preemption, requeue,
job arrays for sweeps). Imports nothing heavy: rendering a script needs no torch."""

from megatron_vlm.cluster.slurm import SlurmJob, read_array_file, render_sbatch, submit

__all__ = ["SlurmJob", "read_array_file", "render_sbatch", "submit"]
