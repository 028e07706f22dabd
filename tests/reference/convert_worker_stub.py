"""A stand-in conversion slice for ``test_convert_workers`` (imports nothing heavy, so the
spawned processes start in a blink)."""

import os


class ConversionError(Exception):
    """Reported by ``run_slices`` by its name, like ``convert.rules.ConversionError``."""


def write_marker(path: str, index: int, count: int, *, fail_at: int = -1) -> None:
    if index == fail_at:
        raise ConversionError(f"slice {index} cannot read its shard")
    with open(f"{path}/slice_{index}_of_{count}", "w") as f:
        f.write(str(os.getpid()))
