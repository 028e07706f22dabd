"""Planning before a job is queued: FLOPs per pipeline stage (ViT on the first), a balanced
stage split megatron can build, and per-GPU memory and step time of candidate layouts.

Pure arithmetic over the typed configs (no torch.distributed, no megatron import), so the
planner runs in a second on a laptop for a 1,024-GPU layout; the tests check its numbers
against megatron-core models built on the ``meta`` device and against the bytes a real tiny
model and its megatron optimizer hold.
"""
