"""Multimodal training data on megatron-energon: blend, encode, pack, shard over DP, resume.

Pipeline per DP rank (energon ``WorkerConfig(rank, world_size, num_workers)``; ranks read disjoint
shard slices)::

    prepared datasets (shards.py), energon/img2dataset datasets read in place (foreign.py)
      --MetadatasetV2 blend (weights per stage)--> shuffle buffer
      -> cook: raw tar members of one sample (a foreign layout mapped to canonical members)
      -> preencode (every sample): probe media headers, plan grids/chunks, the family's media
         template (``media_rules``; Kimi K2.5's by default) ->
         TokenizedSample with empty pixel tensors (cheap: the packing buffer holds many; the
         SlowFast video sampler decodes videos here, its grids depend on the pixels)
      -> select_samples_to_pack: two-budget best fit over the packing buffer (mm_packing)
      -> postencode (only the pack's samples): decode + resize + patchify media, check the grids
         against the plan
      -> pack_selected_samples: PackedBatch + VisionInputs, per-dataset token counts,
         per-sample modality counts (text/image/video/mixed), skips

Bad samples (corrupt/truncated/missing media, empty text, over a budget) are skipped with a
``SkipCounter`` reason in whichever worker meets them; each pack carries the skips its worker
counted since that worker's previous pack, so the training process's totals are exact, also
across resumes (energon replays a worker from its checkpoint; replayed packs are dropped with
their counts). A dataset of garbage still stops the run (``max_consecutive_skips``).

Resume: ``state_dict()`` is energon's ``save_state_rank()`` (per rank, JSON-encoded by
``energon_state``) plus our counters. It is bound to the DP rank, DP size and worker count that
made it: restoring with another DP size is refused with a message (energon's per-worker state
cannot be redistributed), as is a different stage mix or budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from megatron.energon import (
    WorkerConfig,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
)

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.energon_state import (
    STATE_VERSION,
    check_state_compatible,
    decode_state,
    encode_state,
    pack_energon_state,
    unpack_energon_state,
)
from megatron_vlm.data.foreign import (
    CANONICAL,
    SOURCE_FORMAT,
    calibration_members,
    dataset_manifest,
    not_a_dataset_message,
)
from megatron_vlm.data.media_errors import BadSampleError, SkipCounter
from megatron_vlm.data.media_rules import KIMI_MEDIA_RULES, MediaRules
from megatron_vlm.data.mm_encode import (
    EncodedMMSample,
    EncodeSettings,
    MMPack,
    MMTaskEncoder,
    PlannedMedia,
    RawMMSample,
    cook_raw,
    decode_document,
    plan_document,
)
from megatron_vlm.data.mrope_positions import PositionRule
from megatron_vlm.data.shards import iter_shard

# Sample encoding lives in mm_encode.py and the state codec in energon_state.py; their names are
# re-exported here, where they were defined before the split.
__all__ = [
    "STATE_VERSION",
    "DatasetInfo",
    "EncodeSettings",
    "EncodedMMSample",
    "MMPack",
    "MMTaskEncoder",
    "MultimodalLoader",
    "PlannedMedia",
    "RawMMSample",
    "auto_packing_buffer",
    "calibrate",
    "cook_raw",
    "decode_document",
    "decode_state",
    "encode_state",
    "mix_weights",
    "plan_document",
    "resolve_datasets",
]

logger = logging.getLogger(__name__)

STATE_EVERY_N_PACKS = 16
"""Packs between a loader worker's state snapshots (bounds the replay on resume)."""
SAMPLE_MODALITIES = ("text", "image", "video", "mixed")
"""A packed sample's modality (contract 5): no media, images only, videos only, both."""


# ------------------------------------------------------------------------------------ mixing


@dataclass
class DatasetInfo:
    """A prepared dataset in a mix, with its measured token profile."""

    name: str
    path: Path
    modality: str
    manifest: dict[str, Any]
    mean_tokens: float = 0.0
    """LLM tokens per sample (EOS and placeholders included), from calibration."""
    mean_vision_tokens: float = 0.0
    """Media placeholder tokens per sample."""

    @property
    def subflavors(self) -> dict[str, Any]:
        """energon subflavors of its samples (a foreign dataset's selects its cooker)."""
        flavors = {"dataset": self.name, "modality": self.modality}
        source = self.manifest.get(SOURCE_FORMAT, CANONICAL)
        if source != CANONICAL:
            flavors[SOURCE_FORMAT] = source
        return flavors


def resolve_datasets(
    cfg: MultimodalDataConfig, names: list[str], verify: str = "size"
) -> dict[str, DatasetInfo]:
    """Locate (and check the shards of) the datasets a mix names: prepared by
    ``tools/prepare_data.py``, or energon/img2dataset datasets read in place (``foreign.py``)."""
    if cfg.root is None:
        from megatron_vlm.data.mm_corpus import bundled_mm_corpus

        root = bundled_mm_corpus(cfg.cache_dir)
    else:
        root = Path(cfg.root)
    infos = {}
    for name in names:
        path = Path(cfg.datasets.get(name, name))
        path = path if path.is_absolute() else root / path
        if not (path / ".nv-meta").is_dir():
            raise ValueError(f"dataset {name!r}: {not_a_dataset_message(path)}")
        manifest = dataset_manifest(path, verify)
        infos[name] = DatasetInfo(name, path, manifest["modality"], manifest)
    return infos


def calibrate(info: DatasetInfo, encoder: MMTaskEncoder, num_samples: int) -> None:
    """Measure mean tokens and placeholder tokens per sample on up to ``num_samples`` train
    samples spread over the shards (tokenisation only, no media decoding)."""
    shards = [s for s in info.manifest["splits"]["train"]["shards"] if s["samples"]]
    per_shard = -(-num_samples // max(len(shards), 1))
    lengths, vision = [], []
    for shard in shards[:num_samples]:
        for k, (key, members) in enumerate(iter_shard(info.path / shard["path"])):
            if k >= per_shard or len(lengths) >= num_samples:
                break
            try:
                members = calibration_members(info.manifest, key, members)
                doc, _ = plan_document(json.loads(members["json"]), members, encoder.settings,
                                       encoder.tokenizer, encoder.media_ids)
            except (BadSampleError, KeyError, ValueError):
                continue
            lengths.append(len(doc))
            vision.append(sum(span.length for span in doc.placeholder_spans))
    if not lengths:
        raise ValueError(f"dataset {info.name!r}: no usable sample among the first shards")
    info.mean_tokens = float(np.mean(lengths))
    info.mean_vision_tokens = float(np.mean(vision))


def mix_weights(
    mix: StageMix, infos: dict[str, DatasetInfo]
) -> tuple[dict[str, float], dict[str, float]]:
    """energon blend weights (per sample) and the expected LLM-token share of each dataset.

    Token shares divide by each dataset's mean tokens per sample; ``vision_token_fraction``
    first rescales the multimodal datasets' total share (see ``StageMix``).
    """
    weights = {n: w for n, w in mix.weights.items() if w > 0}
    mean = {n: infos[n].mean_tokens for n in weights}
    if mix.unit == "samples":
        total = sum(weights.values())
        samples = {n: w / total for n, w in weights.items()}
        tokens = {n: samples[n] * mean[n] for n in weights}
        norm = sum(tokens.values())
        return samples, {n: t / norm for n, t in tokens.items()}
    total = sum(weights.values())
    shares = {n: w / total for n, w in weights.items()}
    if mix.vision_token_fraction is not None:
        media = [n for n in weights if infos[n].mean_vision_tokens > 0]
        text = [n for n in weights if infos[n].mean_vision_tokens == 0]
        if not media:
            raise ValueError("vision_token_fraction set but no dataset of the mix has media")
        media_total = sum(shares[n] for n in media)
        media_vision = sum(shares[n] / media_total * infos[n].mean_vision_tokens / mean[n]
                           for n in media)
        m = mix.vision_token_fraction / media_vision
        if m > 1.0 + 1e-9:
            raise ValueError(
                f"the multimodal datasets are only {media_vision:.1%} vision tokens, below "
                f"vision_token_fraction={mix.vision_token_fraction}; lower it or mix in "
                "media-heavier data"
            )
        if m < 1.0 and not text:
            raise ValueError("vision_token_fraction < the media datasets' own fraction needs "
                             "a text-only dataset in the mix to fill the rest")
        text_total = sum(shares[n] for n in text) or 1.0
        shares = {**{n: m * shares[n] / media_total for n in media},
                  **{n: (1.0 - m) * shares[n] / text_total for n in text}}
    raw = {n: shares[n] / mean[n] for n in weights}
    norm = sum(raw.values())
    return {n: w / norm for n, w in raw.items()}, shares


def auto_packing_buffer(seq_length: int, mean_tokens: float, packs: int = 32) -> int:
    """Documents that fill about ``packs`` micro-batches (64..8192): the last, partly filled
    pack of each buffer then costs ~1/packs of padding at most."""
    return int(min(8192, max(64, math.ceil(packs * seq_length / max(mean_tokens, 1.0)))))


# ------------------------------------------------------------------------------------ loader


class MultimodalLoader:
    """This DP rank's packed multimodal micro-batches, with energon state for exact resume.

    Same interface as ``TextLoader``: ``next_global_batch()`` returns this rank's
    ``global_batch_size / dp_size`` micro-batches of one optimizer step.

    Args:
        config: Datasets, stage mixes, budgets, workers.
        tokenizer: With the media special tokens of ``media_rules`` (``SpecialTokensTokenizer`` /
            ``KimiTokenizer``).
        seq_length: S, LLM tokens per micro-batch.
        global_batch_size: Micro-batches per optimizer step over all DP ranks.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size (must divide ``global_batch_size``).
        seed: Shuffling/blending seed (energon ``seed_offset``).
        pad_to_multiple: Document span multiple (2·cp·tp).
        stage: Mix to use (default ``config.stage``).
        one_pass: Read the (single) dataset of the mix once instead of forever; the stream then
            ends with ``StopIteration`` (evaluation, data audits, exact skip accounting).
        position_rule: The family's M-RoPE rule (``families/<name>/positions.py``, handed in by
            the trainer: data never imports families); None: the rule of ``media_rules``.
        media_rules: The family's media rules (``media_rules.py``; handed in by the trainer);
            None: Kimi K2.5's.
    """

    def __init__(
        self,
        config: MultimodalDataConfig,
        tokenizer: Any,
        *,
        seq_length: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_to_multiple: int = 1,
        stage: str | None = None,
        one_pass: bool = False,
        position_rule: PositionRule | None = None,
        media_rules: MediaRules | None = None,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"dp_size={dp_size}"
            )
        if seq_length % pad_to_multiple:
            raise ValueError(f"seq_length={seq_length} must be a multiple of "
                             f"pad_to_multiple={pad_to_multiple}")
        self.config = config
        self.stage = stage or config.stage
        if self.stage not in config.mixes:
            raise ValueError(f"stage {self.stage!r} has no mix; choose from {sorted(config.mixes)}")
        self.mix = config.mixes[self.stage]
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.settings = EncodeSettings.from_config(config, seq_length, pad_to_multiple,
                                                   media_rules)
        self.position_rule = (self.settings.rules.position_rule if position_rule is None
                              else position_rule)
        self.encoder = self._new_encoder()
        names = [n for n, w in self.mix.weights.items() if w > 0]
        self.datasets = resolve_datasets(config, names, config.verify_shards)
        for info in self.datasets.values():
            calibrate(info, self.encoder, config.calibration_samples)
        self.sample_weights, self.token_shares = mix_weights(self.mix, self.datasets)
        mean_tokens = sum(w * self.datasets[n].mean_tokens for n, w in self.sample_weights.items())
        self.packing_buffer_size = config.packing_buffer_size or auto_packing_buffer(
            seq_length, mean_tokens)
        if one_pass and len(self.datasets) != 1:
            raise ValueError(f"one_pass reads one dataset; stage {self.stage!r} mixes "
                             f"{sorted(self.datasets)}")
        self.one_pass = one_pass
        self._loader = None
        self._iter = None
        self._restored: Any = None
        self._reset_counters()

    # -- construction

    def _new_encoder(self) -> MMTaskEncoder:
        return MMTaskEncoder(self.tokenizer, self.settings, self.config.max_consecutive_skips,
                             self.config.skip_warn_every, position_rule=self.position_rule)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // self.dp_size

    def _metadataset(self) -> dict[str, Any]:
        blend = [
            {"path": str(self.datasets[n].path), "weight": w,
             "subflavors": self.datasets[n].subflavors}
            for n, w in self.sample_weights.items()
        ]
        return {"__module__": "megatron.energon", "__class__": "MetadatasetV2",
                "splits": {"train": {"blend": blend}}}

    def _worker_config(self, num_workers: int, encoder: MMTaskEncoder) -> WorkerConfig:
        return WorkerConfig(
            rank=self.dp_rank, world_size=self.dp_size, num_workers=num_workers,
            seed_offset=self.seed, global_error_handler=encoder.skips.energon_handler,
        )

    def _build(self) -> None:
        cfg = self.config
        source: Any = self._metadataset()
        extra: dict[str, Any] = {}
        if self.one_pass:  # a plain dataset: energon's weighted blends always repeat
            (info,) = self.datasets.values()
            source = str(info.path)
            extra = {"repeat": False, "subflavors": info.subflavors}
        dataset = get_train_dataset(
            source,
            worker_config=self._worker_config(cfg.num_workers, self.encoder),
            batch_size=None,
            shuffle_buffer_size=cfg.shuffle_buffer_size if cfg.shuffle_buffer_size > 1 else None,
            max_samples_per_sequence=cfg.max_samples_per_sequence,
            packing_buffer_size=self.packing_buffer_size,
            task_encoder=self.encoder,
            **extra,
        )
        # The worker snapshots its state every STATE_EVERY_N_PACKS packs, counted in packs rather
        # than energon's default 60 s of wall time: a saved loader state (the latest snapshot
        # plus the packs to replay after it) then depends only on the data consumed, so an
        # interrupted-and-resumed run saves the same bytes as an uninterrupted one, and a resume
        # replays at most that many packs.
        self._loader = get_savable_loader(dataset, checkpoint_every_sec=0,
                                          checkpoint_every_min_n_samples=STATE_EVERY_N_PACKS)
        if self._restored is not None:
            self._loader.restore_state_rank(self._restored)

    def _next_pack(self) -> MMPack:
        if self.one_pass and self._one_pass_done():
            raise StopIteration
        if self._loader is None:
            self._build()
        if self._iter is None:
            self._iter = iter(self._loader)
        return next(self._iter)

    def _one_pass_done(self) -> bool:
        """Every train sample of the one-pass dataset packed or skipped.

        energon, restored from a state saved after its reader had reached the end (the packing
        buffer held the rest), replays the rest and then starts the dataset again; the stream
        ends here instead. (Counts restored from a state saved before per-sample counts existed
        start at zero, so such a resume is not cut.)
        """
        (info,) = self.datasets.values()
        done = sum(self._samples_by_modality.values()) + self.skips.total
        return done >= info.manifest["splits"]["train"]["samples"]

    def close(self) -> None:
        """Stop the worker processes now; used again, the loader continues where it was.

        Without this, an abandoned loader with workers takes ~10 s to tear down (SPEC §10).
        """
        if self._loader is not None:
            self._restored = self._loader.save_state_rank()
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()  # ends energon's epoch generator -> torch shuts its workers down
        self._iter = self._loader = None

    # -- stepping and accounting

    def _reset_counters(self) -> None:
        self._steps = 0
        self._packs = 0
        self._tokens: Counter[str] = Counter()
        self._image_tokens = self._video_tokens = 0
        self._samples_by_modality: Counter[str] = Counter()
        self._repaired_timestamps = 0
        self.skips = SkipCounter(warn_every=0)
        self.last_step_sample_ids: list[list[str]] = []

    def _account(self, pack: MMPack) -> MMPack:
        self._packs += 1
        self._tokens.update(pack.tokens_per_dataset)
        self._image_tokens += pack.image_tokens
        self._video_tokens += pack.video_tokens
        self._samples_by_modality.update(pack.samples_per_modality)
        self._repaired_timestamps += pack.repaired_timestamps
        self.skips.merge(pack.skips)
        return pack

    def packs(self) -> Iterator[MMPack]:
        """Packed micro-batches one by one, with their sample ids and counts (accounted in
        ``metrics`` and the state like ``next_global_batch``'s)."""
        while True:
            try:
                pack = self._next_pack()
            except StopIteration:
                self._iter = None
                return
            yield self._account(pack)

    def next_global_batch(self) -> list[PackedBatch]:
        """This rank's micro-batches for one optimizer step.

        Raises:
            StopIteration: A ``one_pass`` stream is exhausted.
        """
        packs = [self._account(self._next_pack()) for _ in range(self.micro_batches_per_step)]
        self._steps += 1
        self.last_step_sample_ids = [p.sample_ids for p in packs]
        return [p.batch for p in packs]

    def __enter__(self) -> MultimodalLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> list[str]:
        """The stage's mix for the start-up banner: per dataset its modality, target share,
        sampling weight, mean tokens per sample and location."""
        unit = "LLM tokens" if self.mix.unit == "tokens" else "samples"
        head = f"data: stage {self.stage!r}, shares of {unit}"
        if self.mix.vision_token_fraction is not None:
            head += f", {100 * self.mix.vision_token_fraction:.0f}% vision tokens"
        lines = [head]
        for name, info in self.datasets.items():
            lines.append(
                f"  {name} ({info.modality}): {100 * self.token_shares.get(name, 0.0):.1f}% "
                f"(weight {self.sample_weights.get(name, 0.0):.3f}, "
                f"{info.mean_tokens:.0f} tok/sample) {info.path}")
        return lines

    def metrics(self) -> dict[str, float]:
        """This rank's cumulative data metrics: realised token shares per dataset and dataset
        modality (with targets), packed samples per sample modality (counts and fractions),
        vision token fractions, padding, skips per reason."""
        real = sum(self._tokens.values())
        out: dict[str, float] = {}
        by_modality: Counter[str] = Counter()
        for name, info in self.datasets.items():
            out[f"data/mix/{name}"] = self._tokens[name] / real if real else 0.0
            out[f"data/mix_target/{name}"] = self.token_shares.get(name, 0.0)
            by_modality[info.modality] += self._tokens[name]
        for modality, n in sorted(by_modality.items()):
            out[f"data/modality/{modality}"] = n / real if real else 0.0
        # Per packed sample (contract 5): text / image / video / mixed from its media types.
        num_samples = sum(self._samples_by_modality.values())
        for modality in SAMPLE_MODALITIES:
            n = self._samples_by_modality[modality]
            out[f"data/samples/{modality}"] = float(n)
            out[f"data/sample_fraction/{modality}"] = n / num_samples if num_samples else 0.0
        vision = self._image_tokens + self._video_tokens
        out["data/vision_token_fraction"] = vision / real if real else 0.0
        out["data/image_token_fraction"] = self._image_tokens / real if real else 0.0
        out["data/video_token_fraction"] = self._video_tokens / real if real else 0.0
        total = self._packs * self.seq_length
        out["data/padding_fraction"] = 1.0 - real / total if total else 0.0
        out["data/packs"] = float(self._packs)
        out["data/repaired_timestamps"] = float(self._repaired_timestamps)
        out.update({k: float(v) for k, v in self.skips.as_metrics().items()})
        return out

    # -- state

    def _fingerprint(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.settings)
        if not self.settings.slowfast:
            # Uniform sampling ignores these; leaving them out keeps states saved before the
            # SlowFast option existed resumable.
            settings = {k: v for k, v in settings.items()
                        if k != "video_sampler" and not k.startswith("slowfast_")}
        if self.settings.image_min_patches is None:  # states saved before the option resume
            settings.pop("image_min_patches")
        if self.settings.rules == KIMI_MEDIA_RULES:  # states saved before families resume
            settings.pop("rules")
        return {
            "stage": self.stage,
            "datasets": {n: [str(i.path), i.manifest["splits"]["train"]["samples"]]
                         for n, i in sorted(self.datasets.items())},
            "sample_weights": {n: round(w, 9) for n, w in sorted(self.sample_weights.items())},
            "settings": settings,
            "seed": self.seed,
            "shuffle_buffer_size": self.config.shuffle_buffer_size,
            "packing_buffer_size": self.packing_buffer_size,
            "max_samples_per_sequence": self.config.max_samples_per_sequence,
            "one_pass": self.one_pass,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of this rank's stream (energon's ``save_state_rank``)."""
        raw = self._loader.save_state_rank() if self._loader is not None else self._restored
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.config.num_workers,
            "micro_batches_per_step": self.micro_batches_per_step,
            "fingerprint": self._fingerprint(),
            "steps": self._steps,
            "packs": self._packs,
            "tokens": dict(self._tokens),
            "image_tokens": self._image_tokens,
            "video_tokens": self._video_tokens,
            "samples_by_modality": dict(self._samples_by_modality),
            "repaired_timestamps": self._repaired_timestamps,
            "skips": self.skips.state_dict(),
            "energon": pack_energon_state(raw),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue this rank's stream from ``state`` (same DP layout, mix and budgets).

        Raises:
            ValueError: The state was saved with another DP size/rank or worker count (energon
                cannot redistribute per-worker positions), or another mix/budget/dataset.
        """
        check_state_compatible(state, self.dp_rank, self.dp_size, self.config.num_workers,
                               self._fingerprint())
        self.close()
        self._restored = unpack_energon_state(state["energon"])
        self._steps, self._packs = int(state["steps"]), int(state["packs"])
        self._tokens = Counter(state["tokens"])
        self._image_tokens = int(state["image_tokens"])
        self._video_tokens = int(state["video_tokens"])
        # absent from states saved before per-sample modality counts: those start from zero
        self._samples_by_modality = Counter(
            {str(k): int(v) for k, v in state.get("samples_by_modality", {}).items()})
        self._repaired_timestamps = int(state.get("repaired_timestamps", 0))
        self.skips.load_state_dict(state["skips"])

    # -- validation

    def validation_batches(self, num_batches: int) -> dict[str, list[PackedBatch]]:
        """Held-out packed micro-batches per dataset (``val`` split, file order, this rank's
        share), at most ``num_batches`` each; datasets without a val split are left out."""
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        out: dict[str, list[PackedBatch]] = {}
        for name, info in self.datasets.items():
            if not info.manifest["splits"].get("val", {}).get("samples"):
                continue
            encoder = self._new_encoder()
            dataset = get_val_dataset(
                info.path, split_part="val", worker_config=self._worker_config(0, encoder),
                batch_size=None, packing_buffer_size=self.packing_buffer_size,
                task_encoder=encoder, subflavors=info.subflavors,
            )
            batches: list[PackedBatch] = []
            for pack in get_loader(dataset, watchdog_timeout_seconds=None):
                batches.append(pack.batch)
                if len(batches) == num_batches:
                    break
            out[name] = batches
        return out
