"""Worker for test_convert_parallel.py (2 gloo ranks): load the single-process checkpoint SRC
(written by the HF importer) into the model under TP=2 + SP, save it from both ranks to OUT_TP;
then the same under EP=2 (DP=2) to OUT_EP. megatron reshards on load; each save is that layout's.

    python -m torch.distributed.run --standalone --nproc-per-node=2 convert_parallel_worker.py \
        SRC OUT_TP OUT_EP
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron.core import parallel_state

from megatron_vlm.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from megatron_vlm.config import ParallelConfig
from megatron_vlm.convert.importer import load_job_model
from megatron_vlm.models.vlm import KimiVLM
from megatron_vlm.parallel.init import destroy_distributed, init_distributed


def main() -> None:
    src, out_tp, out_ep = (Path(p) for p in sys.argv[1:4])
    config_yaml = read_manifest(src)["config_yaml"]
    model_cfg = load_job_model(config_yaml)
    layouts = [(out_tp, ParallelConfig(tp=2, sequence_parallel=True)),
               (out_ep, ParallelConfig(ep=2))]
    for out, parallel in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_distributed(parallel, seed=0)
        model = KimiVLM(model_cfg, parallel)
        load_checkpoint(src, [model], None, None, load_optimizer=False)
        save_checkpoint(out, 0, [model], None, None, {}, config_yaml)
    destroy_distributed()


if __name__ == "__main__":
    main()
