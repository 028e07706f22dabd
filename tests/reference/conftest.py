"""The reference tests' fixtures live in ``hf_fixtures.py`` (a module with its own name, so test
files and workers can import its helpers while other test folders have conftests of their own)."""

from hf_fixtures import hf_checkpoint, hf_kimi, media, megatron_groups, ours_from_hf  # noqa: F401
