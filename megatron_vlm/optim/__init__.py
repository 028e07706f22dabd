"""Optimizers and schedules; they see models only through parameters and state dicts."""
