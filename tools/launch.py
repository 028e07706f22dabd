#!/usr/bin/env python
"""Render and submit a SLURM batch job for a recipe or a sweep (see megatron_vlm/cluster/launch.py).

    python tools/launch.py --recipe kimi_k25 --nodes 64 --gpus-per-node 8 --dry-run
"""

import sys

from megatron_vlm.cluster.launch import main

if __name__ == "__main__":
    sys.exit(main())
