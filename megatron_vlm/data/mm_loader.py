"""Multimodal training data on megatron-energon: blend, encode, pack, shard over DP, resume.

Pipeline per DP rank (energon ``WorkerConfig(rank, world_size, num_workers)``; ranks read disjoint
shard slices)::

    prepared datasets (shards.py) --MetadatasetV2 blend (weights per stage)--> shuffle buffer
      -> cook: raw tar members of one sample
      -> preencode (every sample): probe media headers, plan grids/chunks, Kimi templates ->
         TokenizedSample with empty pixel tensors (cheap: the packing buffer holds many)
      -> select_samples_to_pack: two-budget best fit over the packing buffer (mm_packing)
      -> postencode (only the pack's samples): decode + resize + patchify media, check the grids
         against the plan
      -> pack_selected_samples: PackedBatch + VisionInputs, per-dataset token counts, skips

Bad samples (corrupt/truncated/missing media, empty text, over a budget) are skipped with a
``SkipCounter`` reason in whichever worker meets them; each pack carries the skips its worker
counted since that worker's previous pack, so the training process's totals are exact, also
across resumes (energon replays a worker from its checkpoint; replayed packs are dropped with
their counts). A dataset of garbage still stops the run (``max_consecutive_skips``).

Resume: ``state_dict()`` is energon's ``save_state_rank()`` (per rank, JSON-encoded by
``encode_state``) plus our counters. It is bound to the DP rank, DP size and worker count that
made it: restoring with another DP size is refused with a message (energon's per-worker state
cannot be redistributed), as is a different stage mix or budget.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import json
import logging
import math
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from megatron.energon import (
    Cooker,
    Sample,
    SkipSample,
    TaskEncoder,
    WorkerConfig,
    basic_sample_keys,
    edataclass,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    stateless,
)
from megatron.energon.errors import FatalSampleError

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.image import PATCH_SIZE, ProcessedImage, navit_resize, process_image
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaGridError,
    MediaMissingError,
    SkipCounter,
    SkipReason,
)
from megatron_vlm.data.mm_packing import document_cost, pack_tokenized, select_packs
from megatron_vlm.data.shards import BAD_RECORD, FORMAT, iter_shard, load_manifest, verify_shards
from megatron_vlm.data.templates import MediaTokenIds, Text, TokenizedSample, tokenize_interleaved
from megatron_vlm.data.video import (
    TEMPORAL_PATCH_SIZE,
    VideoChunk,
    decode_video,
    process_video,
    sample_frame_indices,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)


# --------------------------------------------------------------------------- sample encoding


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides how one sample is tokenised, sized and packed."""

    seq_length: int
    max_patches: int
    pad_to_multiple: int = 1
    image_max_patches: int = 16384
    video_chunk_max_patches: int = 4096
    video_fps: float = 2.0
    video_max_frames: int = 128
    video_backend: str = "auto"
    markers_loss: bool = True

    @classmethod
    def from_config(
        cls, cfg: MultimodalDataConfig, seq_length: int, pad_to_multiple: int
    ) -> EncodeSettings:
        return cls(
            seq_length=seq_length,
            max_patches=cfg.max_patches_per_micro_batch,
            pad_to_multiple=pad_to_multiple,
            image_max_patches=cfg.image_max_patches,
            video_chunk_max_patches=cfg.video_chunk_max_patches,
            video_fps=cfg.video_fps,
            video_max_frames=cfg.video_max_frames,
            video_backend=cfg.video_backend,
            markers_loss=cfg.markers_loss,
        )


@dataclass
class PlannedMedia:
    """One image or video of a document, not decoded yet."""

    type: str
    data: bytes
    item_indices: list[int]
    """Its items (one image, or the video's chunks) in ``TokenizedSample.items``."""


def _plan_image(data: bytes, s: EncodeSettings) -> ProcessedImage:
    """Grid of an image from its header (EXIF rotation applied, as ``decode_image`` does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large: {exc}", reason=SkipReason.IMAGE_TOO_LARGE)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise MediaDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}")
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        height, width = width, height
    resized, padded = navit_resize(height, width, max_patches=s.image_max_patches)
    grid = (1, padded[0] // PATCH_SIZE, padded[1] // PATCH_SIZE)
    return ProcessedImage(_NO_PIXELS, grid, (height, width), resized)


def _probe_video(data: bytes, s: EncodeSettings) -> tuple[np.ndarray, int, int]:
    """(timestamps of the sampled frames, height, width) from the container header (PyAV),
    by the same rule ``decode_video`` samples with; a full decode when the header lacks counts."""
    import av

    total, fps, height, width = 0, 0.0, 0, 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaDecodeError("no video stream", reason=SkipReason.VIDEO_EMPTY)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total, fps = int(stream.frames), float(rate) if rate else 0.0
            height, width = stream.codec_context.height, stream.codec_context.width
    except BadSampleError:
        raise
    except Exception as exc:  # av.error.* (ValueError/OSError subclasses) on garbage
        raise MediaDecodeError(f"pyav probe: {type(exc).__name__}: {exc}",
                               reason=SkipReason.VIDEO_DECODE) from exc
    if total < 1 or fps <= 0 or height < 1 or width < 1:
        decoded = decode_video(data, s.video_fps, s.video_max_frames, s.video_backend)
        return decoded.timestamps, *decoded.frames.shape[1:3]
    indices = sample_frame_indices(total, fps, s.video_fps, s.video_max_frames)
    return indices / fps, height, width


def _plan_video(data: bytes, s: EncodeSettings) -> list[VideoChunk]:
    timestamps, height, width = _probe_video(data, s)
    _, padded = navit_resize(height, width, max_patches=s.video_chunk_max_patches)
    h, w = padded[0] // PATCH_SIZE, padded[1] // PATCH_SIZE
    chunks = []
    for start in range(0, len(timestamps), TEMPORAL_PATCH_SIZE):
        stamps = tuple(float(t) for t in timestamps[start : start + TEMPORAL_PATCH_SIZE])
        chunks.append(VideoChunk(_NO_PIXELS, (len(stamps), h, w), stamps[0], stamps))
    return chunks


def plan_document(
    record: dict[str, Any],
    members: dict[str, bytes],
    settings: EncodeSettings,
    tokenizer: Any,
    media_ids: MediaTokenIds,
) -> tuple[TokenizedSample, list[PlannedMedia]]:
    """Tokenise one canonical sample (shards.py format) without decoding its media.

    Returns:
        The document (EOS appended as a target; media items with grids but no pixels) and
        its media in order.

    Raises:
        BadSampleError: Bad record, missing/undecodable media header, empty text, over a budget.
    """
    if record.get("format") != FORMAT:
        raise BadSampleError(f"sample format {record.get('format')!r} is not {FORMAT!r}",
                             reason=BAD_RECORD)
    media_meta = record.get("media", [])
    segments: list[Any] = []
    planned: list[PlannedMedia] = []
    num_items = 0
    used: set[int] = set()
    for seg in record.get("segments", []):
        if "text" in seg:
            segments.append(Text(str(seg["text"]), bool(seg.get("loss", True))))
            continue
        i = seg.get("media")
        if not isinstance(i, int) or not 0 <= i < len(media_meta) or i in used:
            raise BadSampleError(f"segment refers to media {i!r}", reason=BAD_RECORD)
        used.add(i)
        meta = media_meta[i]
        if not isinstance(meta, dict) or meta.get("type") not in ("image", "video"):
            raise BadSampleError(f"media entry {meta!r:.80} is malformed", reason=BAD_RECORD)
        data = members.get(f"m{i}.{meta.get('ext')}")
        if not data:
            raise MediaMissingError(f"member m{i}.{meta['ext']} is missing or empty")
        items = [_plan_image(data, settings)] if meta["type"] == "image" else (
            _plan_video(data, settings))
        segments.extend(items)
        planned.append(PlannedMedia(meta["type"], data,
                                    list(range(num_items, num_items + len(items)))))
        num_items += len(items)
    doc = tokenize_interleaved(segments, tokenizer, media_ids, settings.markers_loss)
    doc = TokenizedSample(
        tokens=np.append(doc.tokens, tokenizer.eos_id).astype(np.int64),
        target_mask=np.append(doc.target_mask, True),
        placeholder_spans=doc.placeholder_spans,
        items=doc.items,
    )
    tokens, patches = document_cost(doc, settings.pad_to_multiple)
    if tokens > settings.seq_length or patches > settings.max_patches:
        raise BadSampleError(
            f"{tokens} tokens / {patches} patches over the micro-batch budgets "
            f"{settings.seq_length} / {settings.max_patches}", reason=SkipReason.TOO_LONG)
    return doc, planned


def decode_document(
    doc: TokenizedSample, media: list[PlannedMedia], settings: EncodeSettings
) -> TokenizedSample:
    """Decode a planned document's media and check them against the plan.

    Raises:
        BadSampleError: Undecodable media, or a decode that disagrees with the header probe.
    """
    items = list(doc.items)
    for m in media:
        planned = [items[i] for i in m.item_indices]
        if m.type == "image":
            decoded: list = [process_image(m.data, settings.image_max_patches)]
        else:
            decoded = process_video(m.data, settings.video_fps, settings.video_max_frames,
                                    settings.video_chunk_max_patches, settings.video_backend).chunks
        got = [(d.grid_thw, round(getattr(d, "timestamp", 0.0), 6)) for d in decoded]
        want = [(p.grid_thw, round(getattr(p, "timestamp", 0.0), 6)) for p in planned]
        if got != want:
            raise MediaGridError(f"decoded {m.type} {got} differs from its header {want}")
        for i, d in zip(m.item_indices, decoded):
            items[i] = d
    return dataclasses.replace(doc, items=items)


# ------------------------------------------------------------------------------ task encoder


@edataclass
class RawMMSample(Sample):
    """One sample's tar members (``json`` + ``m<i>.<ext>``) as bytes."""

    members: dict


@edataclass
class EncodedMMSample(Sample):
    """A tokenised document waiting in the packing buffer (media not decoded yet)."""

    sample_id: str
    dataset: str
    doc: TokenizedSample
    media: list


@dataclass
class MMPack:
    """One packed micro-batch with what the training process needs to account for it."""

    batch: PackedBatch
    sample_ids: list[str]
    datasets: list[str]
    """Dataset of each document, in pack order."""
    tokens_per_dataset: dict[str, int]
    """Real LLM tokens per dataset (placeholders included)."""
    image_tokens: int
    video_tokens: int
    skips: dict[str, int]
    """Samples this worker skipped, by reason, since its previous pack."""
    __restore_key__: tuple = ()


@stateless
def cook_raw(sample: dict) -> RawMMSample:
    """energon cooker: keep the raw members (decoding is ours, after the packing choice)."""
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    return RawMMSample(**basic_sample_keys(sample), members=members)


class MMTaskEncoder(TaskEncoder):
    """energon task encoder: raw sample -> planned document -> two-budget packs.

    Args:
        tokenizer: ``encode``/``eos_id``/``pad_id`` plus ``media_token_ids()`` (e.g.
            ``SpecialTokensTokenizer`` or ``KimiTokenizer``).
        settings: Budgets and media sizing.
        max_consecutive_skips: Abort after this many bad samples in a row.
        warn_every: One log line per this many skips.
    """

    decoder = None  # energon hands us raw bytes; images and videos are decoded by our code
    cookers = (Cooker(cook_raw),)

    def __init__(
        self,
        tokenizer: Any,
        settings: EncodeSettings,
        max_consecutive_skips: int = 100,
        warn_every: int = 100,
    ) -> None:
        self.tokenizer = tokenizer
        self.media_ids = tokenizer.media_token_ids()
        self.settings = settings
        self.max_consecutive_skips = max_consecutive_skips
        self.skips = SkipCounter(warn_every=warn_every, name="multimodal data")
        self._reported: Counter[str] = Counter()
        self._consecutive = 0

    def _skipped(self, exc: BadSampleError) -> Exception:
        """Count a bad sample; the exception to raise (energon skips on ``SkipSample``)."""
        self.skips.record(exc)
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive_skips:
            return FatalSampleError(
                f"{self._consecutive} bad samples in a row (last: {exc.reason}: {exc}); the "
                "dataset looks broken: re-run tools/prepare_data.py or fix the mix"
            )
        return SkipSample()

    def encode_raw(self, sample: RawMMSample) -> EncodedMMSample:
        """Plan one raw sample (also used for start-up calibration)."""
        members = sample.members
        try:
            record = json.loads(members["json"])
        except (KeyError, ValueError, TypeError) as exc:
            raise BadSampleError(f"unreadable json member: {exc}", reason=BAD_RECORD) from exc
        if not isinstance(record, dict):
            raise BadSampleError("json member is not an object", reason=BAD_RECORD)
        doc, media = plan_document(record, members, self.settings, self.tokenizer,
                                   self.media_ids)
        flavors = sample.__subflavors__ or {}
        return EncodedMMSample.derive_from(
            sample, sample_id=str(record.get("id", sample.__key__)),
            dataset=str(flavors.get("dataset", "")), doc=doc, media=media,
        )

    @stateless
    def preencode_sample(self, sample: RawMMSample) -> EncodedMMSample:
        try:
            encoded = self.encode_raw(sample)
        except BadSampleError as exc:
            raise self._skipped(exc) from None
        self._consecutive = 0
        return encoded

    def select_samples_to_pack(self, samples: list[EncodedMMSample]) -> list[list]:
        s = self.settings
        costs = [document_cost(x.doc, s.pad_to_multiple) for x in samples]
        return [[samples[i] for i in pack] for pack in select_packs(costs, s.seq_length,
                                                                     s.max_patches)]

    @stateless
    def postencode_sample(self, sample: EncodedMMSample) -> EncodedMMSample:
        try:
            doc = decode_document(sample.doc, sample.media, self.settings)
        except BadSampleError as exc:
            raise self._skipped(exc) from None
        self._consecutive = 0
        return EncodedMMSample.derive_from(sample, sample_id=sample.sample_id,
                                           dataset=sample.dataset, doc=doc, media=[])

    def pack_selected_samples(self, samples: list[EncodedMMSample]) -> MMPack:
        if not samples:  # every document of the pack failed to decode
            raise SkipSample()
        s = self.settings
        batch = pack_tokenized([x.doc for x in samples], s.seq_length,
                               self.tokenizer.pad_id, s.pad_to_multiple)
        tokens: Counter[str] = Counter()
        image_tokens = video_tokens = 0
        for x in samples:
            tokens[x.dataset] += len(x.doc)
            for span in x.doc.placeholder_spans:
                if span.is_video:
                    video_tokens += span.length
                else:
                    image_tokens += span.length
        delta = self.skips.counts - self._reported
        self._reported = Counter(self.skips.counts)
        return MMPack(
            batch=batch,
            sample_ids=[x.sample_id for x in samples],
            datasets=[x.dataset for x in samples],
            tokens_per_dataset=dict(tokens),
            image_tokens=image_tokens,
            video_tokens=video_tokens,
            skips=dict(delta),
        )


# ------------------------------------------------------------------------ loader state codec


def encode_state(obj: Any) -> Any:
    """energon loader state -> JSON-serialisable structure (tagged; see ``decode_state``).

    Handles energon's state dataclasses, dicts (any keys), tuples, bytes, numpy arrays and
    scalars and torch tensors (RNG states), besides JSON scalars and lists.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, np.generic):
        return {"__np__": obj.item(), "dtype": str(obj.dtype)}
    if isinstance(obj, list):
        return [encode_state(v) for v in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v) for v in obj]}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, torch.Tensor):
        arr = obj.detach().cpu().contiguous().numpy()
        return {"__tensor__": base64.b64encode(arr.tobytes()).decode(), "dtype": str(arr.dtype),
                "shape": list(arr.shape)}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": base64.b64encode(arr.tobytes()).decode(), "dtype": str(arr.dtype),
                "shape": list(arr.shape)}
    if isinstance(obj, dict):
        cls = type(obj)
        return {"__dict__": f"{cls.__module__}:{cls.__qualname__}",
                "items": [[encode_state(k), encode_state(v)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj):
        cls = type(obj)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode_state(getattr(obj, f.name))
                           for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot encode {type(obj).__name__} in the loader state")


def _state_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    if module != "builtins" and not module.startswith("megatron.energon"):
        raise ValueError(f"loader state names class {path!r}; only energon classes may load")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls


def decode_state(obj: Any) -> Any:
    """Inverse of ``encode_state``; constructs only builtins and ``megatron.energon`` classes."""
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(decode_state(v) for v in obj["__tuple__"])
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__np__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__np__"])
    if "__ndarray__" in obj or "__tensor__" in obj:
        raw = base64.b64decode(obj.get("__ndarray__", obj.get("__tensor__")))
        arr = np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return torch.from_numpy(arr) if "__tensor__" in obj else arr
    if "__dict__" in obj:
        cls = _state_class(obj["__dict__"])
        return cls((decode_state(k), decode_state(v)) for k, v in obj["items"])
    if "__dataclass__" in obj:
        cls = _state_class(obj["__dataclass__"])
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{obj['__dataclass__']} is not a dataclass")
        return cls(**{k: decode_state(v) for k, v in obj["fields"].items()})
    raise ValueError(f"untagged object in loader state: {sorted(obj)[:5]}")


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


def resolve_datasets(
    cfg: MultimodalDataConfig, names: list[str], verify: str = "size"
) -> dict[str, DatasetInfo]:
    """Locate (and check the shards of) the prepared datasets a mix names."""
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
            raise ValueError(
                f"dataset {name!r}: {path} is not a prepared dataset; prepare it with "
                "tools/prepare_data.py or fix data_mm.root / data_mm.datasets"
            )
        manifest = verify_shards(path, deep=verify == "deep") if verify != "none" else (
            load_manifest(path))
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
        tokenizer: With ``media_token_ids()`` (``SpecialTokensTokenizer`` / ``KimiTokenizer``).
        seq_length: S, LLM tokens per micro-batch.
        global_batch_size: Micro-batches per optimizer step over all DP ranks.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size (must divide ``global_batch_size``).
        seed: Shuffling/blending seed (energon ``seed_offset``).
        pad_to_multiple: Document span multiple (2·cp·tp).
        stage: Mix to use (default ``config.stage``).
        one_pass: Read the (single) dataset of the mix once instead of forever; the stream then
            ends with ``StopIteration`` (evaluation, data audits, exact skip accounting).
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
        self.settings = EncodeSettings.from_config(config, seq_length, pad_to_multiple)
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
                             self.config.skip_warn_every)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // self.dp_size

    def _metadataset(self) -> dict[str, Any]:
        blend = [
            {"path": str(self.datasets[n].path), "weight": w,
             "subflavors": {"dataset": n, "modality": self.datasets[n].modality}}
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
            extra = {"repeat": False,
                     "subflavors": {"dataset": info.name, "modality": info.modality}}
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
        self._loader = get_savable_loader(dataset)
        if self._restored is not None:
            self._loader.restore_state_rank(self._restored)

    def _next_pack(self) -> MMPack:
        if self._loader is None:
            self._build()
        if self._iter is None:
            self._iter = iter(self._loader)
        return next(self._iter)

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
        self.skips = SkipCounter(warn_every=0)
        self.last_step_sample_ids: list[list[str]] = []

    def _account(self, pack: MMPack) -> MMPack:
        self._packs += 1
        self._tokens.update(pack.tokens_per_dataset)
        self._image_tokens += pack.image_tokens
        self._video_tokens += pack.video_tokens
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

    def metrics(self) -> dict[str, float]:
        """This rank's cumulative data metrics: realised token shares per dataset and modality
        (with targets), vision token fractions, padding, skips per reason."""
        real = sum(self._tokens.values())
        out: dict[str, float] = {}
        by_modality: Counter[str] = Counter()
        for name, info in self.datasets.items():
            out[f"data/mix/{name}"] = self._tokens[name] / real if real else 0.0
            out[f"data/mix_target/{name}"] = self.token_shares.get(name, 0.0)
            by_modality[info.modality] += self._tokens[name]
        for modality, n in sorted(by_modality.items()):
            out[f"data/modality/{modality}"] = n / real if real else 0.0
        vision = self._image_tokens + self._video_tokens
        out["data/vision_token_fraction"] = vision / real if real else 0.0
        out["data/image_token_fraction"] = self._image_tokens / real if real else 0.0
        out["data/video_token_fraction"] = self._video_tokens / real if real else 0.0
        total = self._packs * self.seq_length
        out["data/padding_fraction"] = 1.0 - real / total if total else 0.0
        out["data/packs"] = float(self._packs)
        out.update({k: float(v) for k, v in self.skips.as_metrics().items()})
        return out

    # -- state

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "datasets": {n: [str(i.path), i.manifest["splits"]["train"]["samples"]]
                         for n, i in sorted(self.datasets.items())},
            "sample_weights": {n: round(w, 9) for n, w in sorted(self.sample_weights.items())},
            "settings": dataclasses.asdict(self.settings),
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
            "skips": self.skips.state_dict(),
            # energon's state holds RNG states and buffers of restore keys: compact as zlib.
            "energon": base64.b64encode(
                zlib.compress(json.dumps(encode_state(raw)).encode(), 6)).decode(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue this rank's stream from ``state`` (same DP layout, mix and budgets).

        Raises:
            ValueError: The state was saved with another DP size/rank or worker count (energon
                cannot redistribute per-worker positions), or another mix/budget/dataset.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"multimodal loader state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        saved = (state["dp_rank"], state["dp_size"], state["num_workers"])
        now = (self.dp_rank, self.dp_size, self.config.num_workers)
        if saved != now:
            raise ValueError(
                f"multimodal loader state was saved by DP rank {saved[0]} of {saved[1]} with "
                f"{saved[2]} workers; this is rank {now[0]} of {now[1]} with {now[2]}. energon "
                "keeps a separate position per rank and worker, so the data stream cannot be "
                f"resharded: resume with data-parallel size {saved[1]} and "
                f"data_mm.num_workers={saved[2]}, or start the data stream afresh"
            )
        mine = json.loads(json.dumps(self._fingerprint()))
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise ValueError(
                f"multimodal loader state was made with different {', '.join(diff)}; resume "
                "with the same stage mix, datasets, budgets and seed, or start the stream afresh"
            )
        self.close()
        self._restored = decode_state(
            json.loads(zlib.decompress(base64.b64decode(state["energon"]))))
        self._steps, self._packs = int(state["steps"]), int(state["packs"])
        self._tokens = Counter(state["tokens"])
        self._image_tokens = int(state["image_tokens"])
        self._video_tokens = int(state["video_tokens"])
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
                task_encoder=encoder, subflavors={"dataset": name, "modality": info.modality},
            )
            batches: list[PackedBatch] = []
            for pack in get_loader(dataset, watchdog_timeout_seconds=None):
                batches.append(pack.batch)
                if len(batches) == num_batches:
                    break
            out[name] = batches
        return out
