"""Data pipeline: CPU-only, no torch.distributed inside. Hands over ``PackedBatch`` (SPEC §11)."""
