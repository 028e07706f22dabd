"""Models: built from megatron-core modules through specs.

Never import data/training/optim/checkpoint.
"""
