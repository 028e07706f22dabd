"""Staged VLM pretraining (K2.5 / Kimi-VL style) as recipes: each stage is a JobConfig edit with a
defined trainable set, data mix and loss, starting from the previous stage's checkpoint.

======  ===================  ==================================  ===========================
stage   trainable            loss / data (``data.multimodal``)   starts from
======  ===================  ==================================  ===========================
(a)     ViT + projector      LM loss on captions (``alignment``)  an LLM checkpoint (import)
(b)     projector            LM loss on captions (``alignment``)  (a)
(c)     everything           LM loss, early-fusion mix            (b)
                             (``early_fusion``: 10% vision
                             tokens, the rest text)
(d)     everything           LM loss at 2x the sequence,          (c)
                             YaRN factor 2 from (c)'s length,
                             25% ``long`` / 75% replay of the
                             ``joint`` mix; CP raised
======  ===================  ==================================  ===========================

Instead of YaRN, :func:`abf_long_context` extends by raising the RoPE base (ABF; Keye-VL 1.5's
8K -> 32K -> 128K annealing with base 1e6 -> 8e6).

"Starts from" is ``checkpoint.init_from``: the model weights of the previous stage's newest
checkpoint; optimizer state is carried over only when the trainable set is identical (the
trainer compares the set recorded in that checkpoint), otherwise a fresh optimizer is built and
the log says why. The LR schedule, step counter and data stream always start afresh. A stage's
own ``--resume`` (preemption) takes precedence over ``init_from``.

The loss is the same next-token loss in every stage; what differs is which tokens it sees (the
mix) and which weights it moves. Placeholder positions never carry loss (SPEC §11).

Import only ``megatron_vlm.config`` here (recipes rule).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_vlm.config import JobConfig, StageMix

#: The tiny stages' order, with the directory each writes under ``runs/tiny_stages/``.
TINY_STAGE_ORDER = ("tiny_stage_vision", "tiny_stage_projector", "tiny_stage_joint",
                    "tiny_stage_long")
TINY_STAGES_DIR = "runs/tiny_stages"

#: Share of LLM tokens drawn from the long-document dataset in the long-context stage.
LONG_SHARE = 0.25


def _stage(job: JobConfig, *, name: str, freeze_vision: bool, freeze_projector: bool,
           freeze_llm: bool, mix: str, init_from: str | None) -> JobConfig:
    if job.data.multimodal is None or not job.model.is_vlm:
        raise ValueError(f"stage {name!r} needs a VLM job with multimodal data; {job.name!r} "
                         "has none")
    model = dataclasses.replace(job.model, freeze_vision=freeze_vision,
                                freeze_projector=freeze_projector, freeze_llm=freeze_llm)
    mm = dataclasses.replace(job.data.multimodal, stage=mix)
    data = dataclasses.replace(job.data, multimodal=mm)
    ckpt = dataclasses.replace(job.checkpoint, init_from=init_from)
    return dataclasses.replace(job, name=name, model=model, data=data, checkpoint=ckpt)


def vision_alignment(job: JobConfig, init_from: str | None = None) -> JobConfig:
    """(a) ViT + projector learn to caption for a frozen LLM (K2.5 trains MoonViT-3D this way
    against a smaller LLM): caption mix, LLM frozen."""
    return _stage(job, name=f"{job.name}_vision_alignment", freeze_vision=False,
                  freeze_projector=False, freeze_llm=True, mix="alignment", init_from=init_from)


def projector_alignment(job: JobConfig, init_from: str | None = None) -> JobConfig:
    """(b) Only the projector trains (ViT and LLM frozen), on captions: aligns the tower's
    features with the LLM it will be trained with."""
    return _stage(job, name=f"{job.name}_projector_alignment", freeze_vision=True,
                  freeze_projector=False, freeze_llm=True, mix="alignment", init_from=init_from)


def joint_pretraining(job: JobConfig, init_from: str | None = None) -> JobConfig:
    """(c) Everything trains on the early-fusion mix (10% vision tokens, the rest text)."""
    return _stage(job, name=f"{job.name}_joint", freeze_vision=False, freeze_projector=False,
                  freeze_llm=False, mix="early_fusion", init_from=init_from)


def long_context(job: JobConfig, init_from: str | None = None, *, seq_factor: int = 2,
                 cp: int | None = None, long_dataset: str | None = None) -> JobConfig:
    """(d) Long context: ``seq_factor`` x longer packs, YaRN factor raised by ``seq_factor``
    (from the previous stage's length), 25% long documents / 75% replay of the ``joint`` mix.

    Args:
        job: the previous stage's job (its sequence length is YaRN's L0 unless YaRN is on).
        init_from: the previous stage's checkpoint (root or step directory).
        seq_factor: how much longer the packs get.
        cp: context-parallel size of this stage (default: 2x the previous one); needs
            ``world_size`` divisible by ``tp * pp * cp``.
        long_dataset: directory (relative to ``data.multimodal.root``) of the long-document
            dataset, registered under the name ``long``; None = leave ``datasets["long"]`` as
            the job sets it (the tiny recipe points it at the bundled interleaved documents).
    """
    if seq_factor < 2:
        raise ValueError(f"long_context: seq_factor={seq_factor} must be >= 2")
    out = _stage(job, name=f"{job.name}_long", freeze_vision=False, freeze_projector=False,
                 freeze_llm=False, mix="joint", init_from=init_from)
    llm = out.model.llm
    yarn = llm.yarn
    if yarn.enabled:  # already extended: raise the factor, keep L0
        yarn = dataclasses.replace(yarn, factor=yarn.factor * seq_factor)
    else:
        yarn = dataclasses.replace(yarn, factor=float(seq_factor),
                                   original_max_position_embeddings=out.data.seq_length)
    seq = out.data.seq_length * seq_factor
    llm = dataclasses.replace(llm, yarn=yarn,
                              max_position_embeddings=max(llm.max_position_embeddings, seq))
    mm = out.data.multimodal
    replay = mm.mixes["joint"]
    if replay.unit != "tokens" or replay.vision_token_fraction is not None:
        raise ValueError("long_context replays the 'joint' mix; it must be a plain token mix")
    total = sum(replay.weights.values())
    weights = {n: (1 - LONG_SHARE) * w / total for n, w in replay.weights.items()}
    weights["long"] = weights.get("long", 0.0) + LONG_SHARE
    mixes = {**mm.mixes, "long_context": StageMix(weights=weights)}
    datasets = dict(mm.datasets)
    if long_dataset is not None:
        datasets["long"] = long_dataset
    if "long" not in datasets:
        raise ValueError("long_context: name the long-document dataset (long_dataset=... or "
                         "data.multimodal.datasets.long=DIR)")
    mm = dataclasses.replace(mm, stage="long_context", mixes=mixes, datasets=datasets,
                             max_patches_per_micro_batch=mm.max_patches_per_micro_batch
                             * seq_factor)
    data = dataclasses.replace(out.data, seq_length=seq, multimodal=mm)
    parallel = dataclasses.replace(out.parallel, cp=cp if cp is not None else 2 * out.parallel.cp)
    model = dataclasses.replace(out.model, llm=llm)
    return dataclasses.replace(out, model=model, data=data, parallel=parallel)


def abf_long_context(job: JobConfig, init_from: str | None = None, *, seq_length: int,
                     rope_theta: float, cp: int, name: str | None = None,
                     mix: str | None = None, patches: int | None = None,
                     tp: int | None = None) -> JobConfig:
    """Long context by adjusted base frequency (ABF; Keye-VL 1.5's annealing, Qwen's long-context
    stages) instead of YaRN: longer packs and a larger RoPE base (``model.llm.rope_theta``),
    everything trains, starting from the previous stage's weights.

    A new base changes no tensor (the RoPE frequencies are computed from ``rope_theta``, never
    stored in a checkpoint), so ``checkpoint.init_from`` loads the previous stage as is; only a
    resume refuses the changed model (``checkpoint/run_dir.py``).

    Args:
        job: the previous stage's job (YaRN must be off: one extension method at a time).
        init_from: the previous stage's checkpoint (root or step directory).
        seq_length: the new pack length (longer than ``job``'s).
        rope_theta: the new RoPE base (larger than ``job``'s).
        cp: context-parallel size of this stage.
        name: the stage's name (default ``<job>_abf<seq_length>``).
        mix: key of ``data.multimodal.mixes`` to train on (default: ``job``'s stage).
        patches: ViT patch budget per pack (default: ``job``'s scaled with the pack length).
        tp: tensor-parallel size of this stage (default: ``job``'s).
    """
    llm = job.model.llm
    if llm.yarn.enabled:
        raise ValueError("abf_long_context: model.llm.yarn is on; extend with YaRN "
                         "(long_context) or with the RoPE base, not both")
    if seq_length <= job.data.seq_length or rope_theta < llm.rope_theta:
        raise ValueError(
            f"abf_long_context: seq_length={seq_length} must exceed {job.data.seq_length} and "
            f"rope_theta={rope_theta} must be >= model.llm.rope_theta={llm.rope_theta}")
    mm = job.data.multimodal
    stage = mix or (mm.stage if mm is not None else None)
    out = _stage(job, name=name or f"{job.name}_abf{seq_length}", freeze_vision=False,
                 freeze_projector=False, freeze_llm=False, mix=stage, init_from=init_from)
    llm = dataclasses.replace(llm, rope_theta=rope_theta,
                              max_position_embeddings=max(llm.max_position_embeddings,
                                                          seq_length))
    mm = out.data.multimodal
    if patches is None:
        patches = mm.max_patches_per_micro_batch * seq_length // out.data.seq_length
    mm = dataclasses.replace(mm, max_patches_per_micro_batch=patches)
    parallel = dataclasses.replace(out.parallel, cp=cp, tp=tp or out.parallel.tp)
    # context parallelism cuts every document into 2*cp chunks of whole TP shards
    align = 2 * cp * parallel.tp if cp > 1 else 1
    data = dataclasses.replace(out.data, seq_length=seq_length, multimodal=mm,
                               pad_to_multiple=math.lcm(out.data.pad_to_multiple, align))
    return dataclasses.replace(out, model=dataclasses.replace(out.model, llm=llm), data=data,
                               parallel=parallel)


# --- the tiny VLM's stages: a few hundred steps each on CPU (``tools/run_stages.py``) -------------

def _tiny_base() -> JobConfig:
    from megatron_vlm.recipes import RECIPES  # the tiny VLM, whatever its current name

    job = RECIPES["tiny_vlm_cpu"]()
    return dataclasses.replace(job, name="tiny", checkpoint=dataclasses.replace(
        job.checkpoint, save_interval=0))


def _out(job: JobConfig, stage: str) -> JobConfig:
    train = dataclasses.replace(job.train, output_dir=f"{TINY_STAGES_DIR}/{stage}")
    return dataclasses.replace(job, name=stage, train=train)


def _prev(stage: str) -> str:
    return f"{TINY_STAGES_DIR}/{stage}/checkpoints"


def tiny_stage_vision() -> JobConfig:
    """(a) on the tiny VLM from its random init (or ``checkpoint.init_from=`` an import)."""
    job = vision_alignment(_tiny_base())
    return _out(dataclasses.replace(job, optim=dataclasses.replace(job.optim, lr=3e-3)),
                "tiny_stage_vision")


def tiny_stage_projector() -> JobConfig:
    """(b) on the tiny VLM from (a)'s newest checkpoint."""
    return _out(projector_alignment(_tiny_base(), _prev("tiny_stage_vision")),
                "tiny_stage_projector")


def tiny_stage_joint() -> JobConfig:
    """(c) on the tiny VLM from (b)'s newest checkpoint."""
    return _out(joint_pretraining(_tiny_base(), _prev("tiny_stage_projector")),
                "tiny_stage_joint")


def tiny_stage_long() -> JobConfig:
    """(d) on the tiny VLM from (c)'s newest checkpoint: 2x packs, YaRN x2, CP kept at 1 (one
    process; under torchrun add ``parallel.cp=2``). The bundled corpus has no long-document
    dataset: ``long`` points at its interleaved image/video documents, its longest kind."""
    base = _tiny_base()
    mm = dataclasses.replace(base.data.multimodal,
                             datasets={**base.data.multimodal.datasets, "long": "interleaved"})
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, multimodal=mm))
    return _out(long_context(base, _prev("tiny_stage_joint"), cp=1), "tiny_stage_long")


TINY_STAGES = {
    "tiny_stage_vision": tiny_stage_vision,
    "tiny_stage_projector": tiny_stage_projector,
    "tiny_stage_joint": tiny_stage_joint,
    "tiny_stage_long": tiny_stage_long,
}
