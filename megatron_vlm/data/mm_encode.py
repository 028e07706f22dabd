"""Sample encoding for the multimodal loader: plan a document from headers, decode its media later.

``plan_document`` tokenises one canonical sample (shards.py format) with grids read from the media
headers only, so the packing buffer can hold many documents cheaply; ``decode_document`` decodes
the media of the documents a pack chose and checks them against that plan. ``MMTaskEncoder`` runs
both inside energon (preencode -> select_samples_to_pack -> postencode -> pack_selected_samples)
and counts skipped samples per reason (the whole pipeline is described in ``mm_loader``).

With ``video_sampler="slowfast"`` (Keye-VL 1.5, ``slowfast.py``) planning a video decodes it,
since its slow/fast labels and hence its chunk grids depend on the pixels; only the grids are
kept, and the decode after the packing choice recomputes the plan and must agree with it.

What is family-specific (template, image sizing, video items, decoding) comes from the model
family's media rules, ``EncodeSettings.rules`` (``media_rules.py``; Kimi K2.5's by default).
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from megatron.energon import (
    Cooker,
    Sample,
    SkipSample,
    TaskEncoder,
    basic_sample_keys,
    edataclass,
    stateless,
)
from megatron.energon.errors import FatalSampleError

from megatron_vlm.config.data_mm import MultimodalDataConfig
from megatron_vlm.data.chat_turns import chat_segments
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.foreign import (
    SOURCE_FORMAT,
    TextMemberDecoder,
    crude_members,
    sample_members,
)
from megatron_vlm.data.image import (
    MERGE_SIZE,
    PATCH_SIZE,
    ProcessedImage,
    navit_resize,
    process_image,
)
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaGridError,
    MediaMissingError,
    SkipCounter,
    SkipReason,
)
from megatron_vlm.data.media_rules import KIMI_MEDIA_RULES, MediaRules
from megatron_vlm.data.mm_packing import document_cost, pack_tokenized, select_packs
from megatron_vlm.data.mrope_positions import PositionRule
from megatron_vlm.data.shards import BAD_RECORD, FORMAT
from megatron_vlm.data.slowfast import (
    FAST_TOKEN_RATIO,
    PATCH_TOLERANCE,
    SIMILARITY_THRESHOLD,
    SlowFastPlan,
    plan_slowfast,
    process_slowfast,
)
from megatron_vlm.data.templates import Text, TokenizedSample
from megatron_vlm.data.video import (
    TEMPORAL_PATCH_SIZE,
    Clip,
    DecodedVideo,
    VideoChunk,
    decode_video,
    process_video,
    stream_timing,
)
from megatron_vlm.data.video_fit import VideoHeader, fit_videos, media_clip, video_chunks

_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)


# --------------------------------------------------------------------------- sample encoding


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides how one sample is tokenised, sized and packed."""

    seq_length: int
    max_patches: int
    pad_to_multiple: int = 1
    image_max_patches: int = 16384
    image_min_patches: int | None = None
    """Upscale smaller images to this many patches (None: never; see data/image.py)."""
    video_chunk_max_patches: int = 4096
    video_fps: float = 2.0
    video_max_frames: int = 128
    video_min_patches_per_frame: int = 256
    """Lowest per-frame budget a too-long document's videos are fitted down to (video_fit.py)."""
    video_min_fps: float = 0.5
    """Lowest sampling rate a too-long document's videos are fitted down to."""
    video_backend: str = "auto"
    markers_loss: bool = True
    video_sampler: str = "uniform"
    """``uniform`` (Kimi K2.5 chunks) or ``slowfast`` (Keye-VL 1.5; fields below)."""
    slowfast_similarity: float = SIMILARITY_THRESHOLD
    slowfast_fast_ratio: float = FAST_TOKEN_RATIO
    slowfast_reference: str = "last_slow"
    slowfast_patch_tolerance: float = PATCH_TOLERANCE
    slowfast_max_video_tokens: int | None = None
    """Token budget of one video under SlowFast (None: no limit)."""
    rules: MediaRules = KIMI_MEDIA_RULES
    """The model family's media rules (``data/media_rules.py``): template, sizing, sampling,
    decoding, position rule. Kimi K2.5's by default."""

    @classmethod
    def from_config(
        cls, cfg: MultimodalDataConfig, seq_length: int, pad_to_multiple: int,
        rules: MediaRules | None = None,
    ) -> EncodeSettings:
        sf = cfg.slowfast
        max_video_tokens = sf.max_video_tokens
        if max_video_tokens is None:  # what the uniform sampler can spend at most
            max_video_tokens = (-(-cfg.video_max_frames // TEMPORAL_PATCH_SIZE)
                                * cfg.video_chunk_max_patches // (MERGE_SIZE * MERGE_SIZE))
        return cls(
            seq_length=seq_length,
            max_patches=cfg.max_patches_per_micro_batch,
            pad_to_multiple=pad_to_multiple,
            image_max_patches=cfg.image_max_patches,
            image_min_patches=cfg.image_min_patches,
            video_chunk_max_patches=cfg.video_chunk_max_patches,
            video_fps=cfg.video_fps,
            video_max_frames=cfg.video_max_frames,
            video_min_patches_per_frame=cfg.video_min_patches_per_frame,
            video_min_fps=cfg.video_min_fps,
            video_backend=cfg.video_backend,
            markers_loss=cfg.markers_loss,
            video_sampler=cfg.video_sampler,
            slowfast_similarity=sf.similarity_threshold,
            slowfast_fast_ratio=sf.fast_token_ratio,
            slowfast_reference=sf.reference,
            slowfast_patch_tolerance=sf.patch_tolerance,
            slowfast_max_video_tokens=max_video_tokens,
            rules=KIMI_MEDIA_RULES if rules is None else rules,
        )

    @property
    def slowfast(self) -> bool:
        return self.video_sampler == "slowfast"


@dataclass
class PlannedMedia:
    """One image or video of a document, not decoded yet."""

    type: str
    data: bytes
    item_indices: list[int]
    """Its items (one image, or the video's chunks) in ``TokenizedSample.items``."""
    clip: Clip | None = None
    """Video span ``(start_s, end_s)`` of the source to sample (the media meta's ``clip``)."""
    fps: float | None = None
    """Sampling rate the video was planned with (None: ``EncodeSettings.video_fps``)."""
    frame_max_patches: int | None = None
    """Per-frame patch budget the video was planned with (None: ``video_chunk_max_patches``)."""
    fit: str = "unchanged"
    """How the document's videos were fitted to the budgets: ``unchanged``, ``resolution`` or
    ``fps`` (video_fit.py)."""
    timestamps_repaired: bool = False
    """The video's timestamps were broken and rebuilt from its nominal frame rate (counted as
    ``repaired_timestamps``)."""


def plan_kimi_image(data: bytes, s: EncodeSettings) -> ProcessedImage:
    """Grid of an image from its header (EXIF rotation applied, as ``decode_image`` does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large: {exc}",
                               reason=SkipReason.IMAGE_TOO_LARGE) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise MediaDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        height, width = width, height
    resized, padded = navit_resize(height, width, max_patches=s.image_max_patches,
                                   min_patches=s.image_min_patches)
    grid = (1, padded[0] // PATCH_SIZE, padded[1] // PATCH_SIZE)
    return ProcessedImage(_NO_PIXELS, grid, (height, width), resized)


def _probe_video(data: bytes, s: EncodeSettings, clip: Clip | None = None) -> VideoHeader:
    """Frame count, timing rate and size of a video from its container header and a demux
    (PyAV; timestamps checked as ``decode_video`` does); a full decode when the header lacks
    counts."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaDecodeError("no video stream", reason=SkipReason.VIDEO_EMPTY)
            timing = stream_timing(container, container.streams.video[0])
    except BadSampleError:
        raise
    except Exception as exc:  # av.error.* (ValueError/OSError subclasses) on garbage
        raise MediaDecodeError(f"pyav probe: {type(exc).__name__}: {exc}",
                               reason=SkipReason.VIDEO_DECODE) from exc
    if (timing.total_frames < 1 or timing.fps <= 0 or timing.height < 1
            or timing.width < 1):
        decoded = decode_video(data, s.video_fps, s.video_max_frames, s.video_backend, clip=clip)
        return VideoHeader(total_frames=decoded.total_frames, fps=decoded.fps,
                           height=decoded.frames.shape[1], width=decoded.frames.shape[2],
                           timestamps_repaired=decoded.timestamps_repaired, clip=clip)
    header = VideoHeader(total_frames=timing.total_frames, fps=timing.fps, height=timing.height,
                         width=timing.width, timestamps_repaired=timing.repaired, clip=clip)
    header.frame_indices(s.video_fps, s.video_max_frames)  # a span without frames raises here
    return header


def _slowfast_plan(decoded: DecodedVideo, s: EncodeSettings) -> SlowFastPlan:
    return plan_slowfast(decoded.frames, s.slowfast_max_video_tokens, s.slowfast_similarity,
                         s.slowfast_fast_ratio, s.slowfast_reference, s.video_chunk_max_patches,
                         s.slowfast_patch_tolerance)


def plan_kimi_video(data: bytes, s: EncodeSettings,
                    clip: Clip | None = None) -> tuple[VideoHeader | list[VideoChunk], bool]:
    """(uniform: the header, chunked later at the fitted settings by ``video_chunks``;
    SlowFast: the chunks, not fitted), whether the timestamps were repaired."""
    if s.slowfast:  # the slow/fast labels need pixels: decode now (pixels are not kept)
        decoded = decode_video(data, s.video_fps, s.video_max_frames, s.video_backend, clip=clip)
        plan = _slowfast_plan(decoded, s)
        stamps = [float(t) for t in decoded.timestamps]
        chunks = [VideoChunk(_NO_PIXELS, grid, stamps[a], tuple(stamps[a:b]), is_fast=fast)
                  for (a, b), grid, fast in zip(plan.chunks, plan.grids, plan.chunk_is_fast)]
        return chunks, decoded.timestamps_repaired
    header = _probe_video(data, s, clip)
    return header, header.timestamps_repaired


def _tokenize(parts: list, s: EncodeSettings, tokenizer: Any, media_ids: Any,
              frame_max_patches: int, fps: float) -> tuple[TokenizedSample, list[int]]:
    """The document of ``parts`` (Text, an image, a video header or a video's items) with the
    videos at these settings, by the family's template, EOS appended; and the item count of
    each media."""
    groups: list[Any] = []
    counts: list[int] = []
    for part in parts:
        if isinstance(part, Text):
            groups.append(part)
            continue
        if isinstance(part, VideoHeader):
            items: list = video_chunks(part, frame_max_patches, fps, s.video_max_frames)
            groups.append(items)
        elif isinstance(part, list):
            items = part
            groups.append(items)
        else:
            items = [part]
            groups.append(part)
        counts.append(len(items))
    doc = s.rules.tokenize(groups, tokenizer, media_ids, s.markers_loss)
    doc = TokenizedSample(
        tokens=np.append(doc.tokens, tokenizer.eos_id).astype(np.int64),
        target_mask=np.append(doc.target_mask, True),
        placeholder_spans=doc.placeholder_spans,
        items=doc.items,
    )
    return doc, counts


def plan_document(
    record: dict[str, Any],
    members: dict[str, bytes],
    settings: EncodeSettings,
    tokenizer: Any,
    media_ids: Any,
) -> tuple[TokenizedSample, list[PlannedMedia]]:
    """Tokenise one canonical sample (shards.py format) without decoding its media, by the
    family's media rules (``settings.rules``; ``media_ids``: ``settings.rules.media_ids(
    tokenizer)``).

    A document over a budget that holds (uniform-sampled) video is fitted first: lower
    per-frame resolution, then lower sampling rate (video_fit.py); the settings chosen are kept
    on its ``PlannedMedia`` for ``decode_document``.

    Returns:
        The document (EOS appended as a target; media items with grids but no pixels) and
        its media in order.

    Raises:
        BadSampleError: Bad record, missing/undecodable media header, empty text, over a budget
            even after fitting (``too_long``), broken video timestamps without a frame rate.
    """
    if record.get("format") != FORMAT:
        raise BadSampleError(f"sample format {record.get('format')!r} is not {FORMAT!r}",
                             reason=BAD_RECORD)
    media_meta = record.get("media", [])
    parts: list[Any] = []
    planned: list[PlannedMedia] = []
    used: set[int] = set()
    for seg in chat_segments(record.get("segments", []), settings.rules, tokenizer):
        if "text" in seg:
            parts.append(Text(str(seg["text"]), bool(seg.get("loss", True)),
                              bool(seg.get("special", False))))
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
        if meta["type"] == "image":
            parts.append(settings.rules.plan_image(data, settings))
            planned.append(PlannedMedia("image", data, []))
        else:
            clip = media_clip(meta)
            video, repaired = settings.rules.plan_video(data, settings, clip)
            parts.append(video)
            planned.append(PlannedMedia("video", data, [], clip=clip,
                                        timestamps_repaired=repaired))
    built: dict[tuple[int, float], tuple[TokenizedSample, list[int]]] = {}

    def build(frame_max_patches: int, fps: float) -> tuple[TokenizedSample, list[int]]:
        key = (frame_max_patches, fps)
        if key not in built:
            built[key] = _tokenize(parts, settings, tokenizer, media_ids, frame_max_patches, fps)
        return built[key]

    def fits(frame_max_patches: int, fps: float) -> bool:
        tokens, patches = document_cost(build(frame_max_patches, fps)[0],
                                        settings.pad_to_multiple)
        return tokens <= settings.seq_length and patches <= settings.max_patches

    s = settings
    fit = fit_videos(fits, [p for p in parts if isinstance(p, VideoHeader)],
                     frame_max_patches=s.video_chunk_max_patches, fps=s.video_fps,
                     min_patches_per_frame=s.video_min_patches_per_frame,
                     min_fps=s.video_min_fps, max_frames=s.video_max_frames)
    if fit is None:
        tokens, patches = document_cost(build(s.video_chunk_max_patches, s.video_fps)[0],
                                        s.pad_to_multiple)
        fitted = (f" (videos fitted down to {s.video_min_patches_per_frame} patches per frame "
                  f"at {s.video_min_fps:g} fps do not fit either)"
                  if any(isinstance(p, VideoHeader) for p in parts) else "")
        raise BadSampleError(
            f"{tokens} tokens / {patches} patches over the micro-batch budgets "
            f"{s.seq_length} / {s.max_patches}{fitted}", reason=SkipReason.TOO_LONG)
    doc, counts = build(fit.frame_max_patches, fit.fps)
    first = 0
    media_parts = [p for p in parts if not isinstance(p, Text)]
    for m, n, part in zip(planned, counts, media_parts):
        m.item_indices = list(range(first, first + n))
        first += n
        if isinstance(part, VideoHeader):  # fitted (Kimi's uniform sampler)
            m.fps, m.frame_max_patches, m.fit = fit.fps, fit.frame_max_patches, fit.kind
    return doc, planned


def _item_key(item: ProcessedImage | VideoChunk) -> tuple:
    """What a decoded item must share with its plan: grid, timestamp, SlowFast kind."""
    return (tuple(item.grid_thw), round(getattr(item, "timestamp", 0.0), 6),
            bool(getattr(item, "is_fast", False)))


def decode_kimi_media(m: PlannedMedia, settings: EncodeSettings) -> list:
    """Kimi's decode of one planned image or video (``KimiMediaRules.decode``)."""
    if m.type == "image":
        return [process_image(m.data, settings.image_max_patches,
                              min_patches=settings.image_min_patches)]
    if settings.slowfast:
        video = decode_video(m.data, settings.video_fps, settings.video_max_frames,
                             settings.video_backend, clip=m.clip)
        return process_slowfast(video.frames, video.timestamps, _slowfast_plan(video, settings))
    # at the settings the plan fitted the document to
    fps = settings.video_fps if m.fps is None else m.fps
    budget = (settings.video_chunk_max_patches if m.frame_max_patches is None
              else m.frame_max_patches)
    return process_video(m.data, fps, settings.video_max_frames, budget,
                         settings.video_backend, clip=m.clip).chunks


def decode_document(
    doc: TokenizedSample, media: list[PlannedMedia], settings: EncodeSettings
) -> TokenizedSample:
    """Decode a planned document's media (``settings.rules.decode``) and check them against
    the plan.

    Raises:
        BadSampleError: Undecodable media, or a decode that disagrees with the header probe.
    """
    items = list(doc.items)
    for m in media:
        planned = [items[i] for i in m.item_indices]
        decoded = settings.rules.decode(m, settings)
        got = [_item_key(d) for d in decoded]
        want = [_item_key(p) for p in planned]
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
    repaired_timestamps: int = 0
    """Videos of the document whose frame timestamps were rebuilt from the nominal rate."""


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
    samples_per_modality: dict[str, int] = dataclasses.field(default_factory=dict)
    """Documents of the pack by modality: ``text`` (no media), ``image``, ``video``, ``mixed``."""
    repaired_timestamps: int = 0
    """Videos of the pack whose all-zero/repeating frame timestamps were rebuilt from the
    stream's nominal rate (``video.read_timing``)."""
    __restore_key__: tuple = ()


@stateless
def cook_raw(sample: dict) -> RawMMSample:
    """energon cooker: keep the raw members (decoding is ours, after the packing choice).

    A crude dataset of another layout (subflavor ``source_format``: energon interleaved,
    img2dataset; see ``foreign.py``) is mapped to canonical members here.
    """
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    source = (sample.get("__subflavors__") or {}).get(SOURCE_FORMAT)
    if source is not None:
        try:
            members = crude_members(source, sample["__key__"], members)
        except BadSampleError as exc:  # skipped like any bad sample, with its reason
            members = {"__error__": exc}
    return RawMMSample(**basic_sample_keys(sample), members=members)


class MMTaskEncoder(TaskEncoder):
    """energon task encoder: raw sample -> planned document -> two-budget packs.

    Args:
        tokenizer: ``encode``/``eos_id``/``pad_id`` and the media special tokens of
            ``settings.rules`` (e.g. ``SpecialTokensTokenizer`` or ``KimiTokenizer``).
        settings: Budgets, media sizing and the family's media rules.
        max_consecutive_skips: Abort after this many bad samples in a row.
        warn_every: One log line per this many skips.
        position_rule: The model family's M-RoPE position rule (a module-level function, so
            the encoder pickles to energon's workers); packs then carry ``mrope_position_ids``.
            None for 1D-RoPE families.
    """

    # energon decodes txt/json members of foreign datasets only (their field maps read them);
    # images and videos stay bytes, decoded by our code (foreign.TextMemberDecoder)
    decoder = TextMemberDecoder()
    cookers = (Cooker(cook_raw),)

    def __init__(
        self,
        tokenizer: Any,
        settings: EncodeSettings,
        max_consecutive_skips: int = 100,
        warn_every: int = 100,
        position_rule: PositionRule | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.position_rule = position_rule
        self.media_ids = settings.rules.media_ids(tokenizer)
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
        if not isinstance(sample, RawMMSample):  # a typed energon sample (foreign.py)
            members = sample_members(sample)
        elif "__error__" in sample.members:
            raise sample.members["__error__"]  # the cooker could not map it
        else:
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
            repaired_timestamps=sum(bool(m.timestamps_repaired) for m in media),
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
                                           dataset=sample.dataset, doc=doc, media=[],
                                           repaired_timestamps=sample.repaired_timestamps)

    def pack_selected_samples(self, samples: list[EncodedMMSample]) -> MMPack:
        if not samples:  # every document of the pack failed to decode
            raise SkipSample()
        s = self.settings
        batch = pack_tokenized([x.doc for x in samples], s.seq_length,
                               self.tokenizer.pad_id, s.pad_to_multiple, self.position_rule)
        tokens: Counter[str] = Counter()
        modalities: Counter[str] = Counter()
        image_tokens = video_tokens = 0
        for x in samples:
            tokens[x.dataset] += len(x.doc)
            kinds = {span.is_video for span in x.doc.placeholder_spans}
            modalities[("text", "image", "video", "mixed")[
                (False in kinds) + 2 * (True in kinds)]] += 1
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
            samples_per_modality=dict(modalities),
            repaired_timestamps=sum(x.repaired_timestamps for x in samples),
        )
