"""Vision probes of a trained VLM run: held-out caption loss with the true media, with media
shuffled between samples, and with every video played backwards (all and direction words only).

    python tools/vision_probe.py runs/tiny_cpu            # prints one JSON line: PROBE {...}
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (job.yaml + checkpoints/)")
    parser.add_argument("--batches", type=int, default=16,
                        help="held-out micro-batches per dataset (default 16)")
    args = parser.parse_args(argv)
    from megatron_vlm.training.probes import run_vision_probes

    print("PROBE " + json.dumps(run_vision_probes(args.run_dir, args.batches)), flush=True)


if __name__ == "__main__":
    main()
