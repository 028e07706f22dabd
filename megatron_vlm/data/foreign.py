"""Datasets that are not ours, trained on in place: energon-prepared and img2dataset WebDatasets.

``MultimodalLoader`` reads three kinds of dataset directory besides the ones ``prepare_data``
writes (``mm_dataset.json`` + canonical shards):

- ``energon prepare`` with a field map, as ``CaptioningSample`` (``image``, ``caption``) or
  ``VQASample`` (``image``, ``context``, ``answers``, ``answer_weights``), e.g.
  ``energon prepare DIR --sample-type VQASample --field-map
  '{"image": "jpg", "context": "json[question]", "answers": "json[answers]"}'``. energon hands
  the typed sample to the task encoder, which maps it here to a canonical record: a caption is
  ``<image> caption`` (trained on); a VQA sample is a role-tagged conversation (a user turn
  ``<image>context``, an assistant turn ``answer``; the family's chat template writes them,
  ``chat_turns.py``) with loss on the answer only (the highest weighted answer, else the
  first). Media stay bytes: ``TextMemberDecoder`` decodes only ``txt``/``json`` members.
- ``energon prepare --sample-type CrudeWebdataset`` of interleaved documents (energon's field map
  cannot build ``InterleavedSample.sequence``, a list). Our cooker reads this member layout::

      KEY.json    {"sequence": ["text", {"image": "0.jpg"}, "more text", {"video": "1.mp4"}]}
      KEY.0.jpg   the media parts the sequence names (the part after ``KEY.``; any name)
      KEY.1.mp4

  Strings are text (trained on); ``{"image": part}`` / ``{"video": part}`` place that member.
- img2dataset output (``00000.tar`` holding ``KEY.jpg|png|webp`` + ``KEY.txt`` + ``KEY.json``,
  parquet/stats files beside), indexed in place by ``index_in_place``: it writes energon's index
  (``.nv-meta/`` with a ``CrudeWebdataset`` whose subflavor selects our cooker, and energon's
  ``<shard>.tar.idx`` offsets beside each tar, which energon's reader needs) and nothing else.
  A sample is ``<image> caption`` (``txt``, else the json's ``caption``).

For such a directory ``synthesize_manifest`` builds the manifest ``mm_dataset.json`` would hold
(splits, shards and sample counts from energon's ``.nv-meta``; modality from the sample type), and
every sample maps to canonical members (``json`` + ``m<i>.<ext>``, ``records.CanonicalSample``),
so planning, packing and calibration are unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import yaml
from braceexpand import braceexpand
from megatron.energon.flavors.webdataset.field_access import field_access
from megatron.energon.flavors.webdataset.sample_decoder import SampleDecoder

from megatron_vlm.data.media_errors import BadSampleError, MediaDecodeError, SkipReason
from megatron_vlm.data.records import (
    BAD_RECORD,
    FORMAT,
    CanonicalSample,
    MediaItem,
    check_text,
)
from megatron_vlm.data.shards import (
    MANIFEST_NAME,
    ShardVerificationError,
    iter_shard,
    load_manifest,
    verify_shards,
)

SOURCE_FORMAT = "source_format"
"""Subflavor (and manifest key) naming how a dataset's samples map to canonical records."""
CANONICAL = "canonical"
ENERGON_TYPED = "energon_typed"
ENERGON_INTERLEAVED = "energon_interleaved"
IMG2DATASET = "img2dataset"
TYPED_MODALITY = {"CaptioningSample": "image", "VQASample": "image"}
"""energon sample types read through their field map, and the modality they carry."""
IMAGE_PARTS = ("jpg", "jpeg", "png", "webp")
META = ".nv-meta"


# -------------------------------------------------------------------------- sample mapping


class TextMemberDecoder(SampleDecoder):
    """energon decoder that decodes ``txt`` (str) and ``json`` members only.

    energon's field map reads ``json[question]`` from decoded members; images and videos stay
    bytes (decoded by our code after the packing choice). Samples in the canonical layout
    (``json`` + ``m<i>.<ext>`` members) are left untouched, so ours load exactly as before.
    """

    def __init__(self) -> None:  # no webdataset handlers: nothing but text is decoded
        self._config = {"decode": "txt,json"}

    def __call__(self, sample: dict) -> dict:
        parts = [k for k in sample if not k.startswith("__")]
        if all(k == "json" or (k[:1] == "m" and k[1:].split(".")[0].isdigit()) for k in parts):
            return sample
        out = dict(sample)
        for k in parts:
            ext = k.rsplit(".", 1)[-1]
            if ext not in ("txt", "json") or not isinstance(out[k], bytes):
                continue
            try:
                out[k] = out[k].decode("utf-8") if ext == "txt" else json.loads(out[k])
            except ValueError:  # left as bytes: our mapping rejects it with a skip reason
                pass
        return out

    def decode(self, fname: str, raw: bytes) -> Any:
        return self({"__key__": "", fname.rsplit(".", 1)[-1]: raw}).popitem()[1]

    def config(self) -> dict:
        return self._config


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSampleError(f"{what} is not UTF-8: {exc}", reason=BAD_RECORD) from None
    return check_text(value, what)


def _json(value: Any, what: str) -> Any:
    if isinstance(value, (bytes, str)):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise BadSampleError(f"{what} is not JSON: {exc}", reason=BAD_RECORD) from None
    return value


def _media(data: Any, what: str) -> MediaItem:
    """Media bytes with their type and extension sniffed from the magic bytes."""
    if not isinstance(data, bytes) or not data:
        raise MediaDecodeError(f"{what}: no media bytes ({type(data).__name__})", media=what)
    head = data[:16]
    if head.startswith(b"\xff\xd8"):
        return MediaItem("image", data, "jpg")
    if head.startswith(b"\x89PNG"):
        return MediaItem("image", data, "png")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return MediaItem("image", data, "webp")
    if head.startswith((b"GIF8", b"BM")):
        return MediaItem("image", data, "gif" if head[:1] == b"G" else "bmp")
    if head[4:8] == b"ftyp":
        return MediaItem("video", data, "mp4")
    if head.startswith(b"\x1aE\xdf\xa3"):
        return MediaItem("video", data, "mkv")
    raise MediaDecodeError(f"{what}: not an image or video this loader reads", media=what)


def _members(key: str, kind: str, segments: list[dict], media: list[MediaItem]) -> dict:
    """Canonical members of one sample, named as energon hands them over (no key prefix)."""
    named = CanonicalSample(key, kind, segments, media).to_members(key)
    return {name[len(key) + 1:]: data for name, data in named.items()}


def caption_members(key: str, image: Any, caption: Any) -> dict[str, bytes]:
    """A captioned image (energon ``CaptioningSample``, img2dataset) -> canonical members."""
    text = _text(caption, f"{key}: caption")
    if not text.strip():
        raise BadSampleError(f"{key}: empty caption", reason=SkipReason.EMPTY_TEXT)
    media = [_media(image, f"{key}: image")]
    return _members(key, "caption", [{"media": 0}, {"text": text, "loss": True}], media)


def vqa_members(key: str, image: Any, context: Any, answers: Any,
                answer_weights: Any = None) -> dict[str, bytes]:
    """energon ``VQASample`` -> a one-turn conversation (loss on the answer only)."""
    answers = [answers] if isinstance(answers, (str, bytes)) else answers
    if not answers:
        raise BadSampleError(f"{key}: VQA sample without answers", reason=BAD_RECORD)
    best = 0
    if answer_weights is not None and len(answer_weights) == len(answers):
        weights = [float(w) for w in answer_weights]
        best = weights.index(max(weights))
    answer = _text(answers[best], f"{key}: answer")
    segments = [  # role-tagged turns: the family's chat template writes them (chat_turns.py)
        {"turn": "user"}, {"media": 0},
        {"text": _text(context, f"{key}: context"), "loss": False},
        {"turn": "assistant"}, {"text": answer, "loss": True},
    ]
    return _members(key, "conversation", segments, [_media(image, f"{key}: image")])


def interleaved_members(key: str, members: dict[str, Any]) -> dict[str, bytes]:
    """A crude interleaved sample (layout in the module docstring) -> canonical members."""
    doc = _json(members.get("json"), f"{key}.json")
    sequence = doc.get("sequence") if isinstance(doc, dict) else None
    if not isinstance(sequence, list) or not sequence:
        raise BadSampleError(f"{key}.json has no 'sequence' list", reason=BAD_RECORD)
    segments: list[dict] = []
    media: list[MediaItem] = []
    for item in sequence:
        if isinstance(item, str):
            segments.append({"text": _text(item, f"{key}: text"), "loss": True})
            continue
        kind = next((k for k in ("image", "video") if isinstance(item, dict) and k in item), None)
        if kind is None:
            raise BadSampleError(f"{key}: sequence item {item!r:.80} is not text, "
                                 "{'image': part} or {'video': part}", reason=BAD_RECORD)
        part = str(item[kind])
        if part not in members:
            raise BadSampleError(f"{key}: member {key}.{part} is missing",
                                 reason=SkipReason.MISSING_FILE, media=f"{key}.{part}")
        m = _media(members[part], f"{key}.{part}")
        if m.type != kind:
            raise BadSampleError(f"{key}.{part} is not a {kind}", reason=BAD_RECORD)
        media.append(m)
        segments.append({"media": len(media) - 1})
    return _members(key, "interleaved", segments, media)


def img2dataset_members(key: str, members: dict[str, Any]) -> dict[str, bytes]:
    """An img2dataset sample (``jpg|png|webp`` + ``txt`` + ``json``) -> canonical members."""
    part = next((p for p in IMAGE_PARTS if p in members), None)
    if part is None:
        raise BadSampleError(f"{key}: no {'|'.join(IMAGE_PARTS)} member",
                             reason=SkipReason.MISSING_FILE, media=key)
    caption = members.get("txt")
    if caption is None and "json" in members:
        caption = (_json(members["json"], f"{key}.json") or {}).get("caption")
    return caption_members(key, members[part], caption)


def crude_members(source_format: str, key: str, members: dict[str, Any]) -> dict[str, Any]:
    """Members of a crude sample as canonical members (ours pass through unchanged)."""
    if source_format == ENERGON_INTERLEAVED:
        return interleaved_members(key, members)
    if source_format == IMG2DATASET:
        return img2dataset_members(key, members)
    return members


def typed_members(sample_type: str, key: str, fields: dict[str, Any]) -> dict[str, bytes]:
    """The fields of a typed energon sample (``CaptioningSample``, ``VQASample``) -> canonical
    members."""
    if sample_type == "CaptioningSample":
        return caption_members(key, fields.get("image"), fields.get("caption"))
    if sample_type == "VQASample":
        return vqa_members(key, fields.get("image"), fields.get("context"),
                           fields.get("answers"), fields.get("answer_weights"))
    raise BadSampleError(f"energon sample type {sample_type} is not read by this loader; use "
                         f"{sorted(TYPED_MODALITY)} or a CrudeWebdataset", reason=BAD_RECORD)


def sample_members(sample: Any) -> dict[str, bytes]:
    """A typed energon sample object, as the task encoder receives it -> canonical members."""
    fields = {f: getattr(sample, f, None)
              for f in ("image", "caption", "context", "answers", "answer_weights")}
    return typed_members(type(sample).__name__, sample.__key__, fields)


def calibration_members(manifest: dict[str, Any], key: str, members: dict[str, bytes]) -> dict:
    """Raw tar members of one sample (``shards.iter_shard``) -> canonical members, as training
    would see them (typed datasets through their own field map, by energon's field access)."""
    source = manifest.get(SOURCE_FORMAT, CANONICAL)
    if source != ENERGON_TYPED:
        return crude_members(source, key, members)
    decoded = TextMemberDecoder()({"__key__": key, **members})
    try:
        fields = {name: field_access(decoded, access)
                  for name, access in manifest["field_map_access"].items()}
    except Exception as exc:  # energon's FieldAccessError / KeyError on a sample without a part
        raise BadSampleError(f"{key}: field map: {exc}", reason=BAD_RECORD) from None
    return typed_members(manifest["sample_type"], key, fields)


# ------------------------------------------------------------------------- dataset manifests


def _first_sample(path: Path, shards: list[str]) -> dict[str, bytes]:
    for shard in shards:
        for _key, members in iter_shard(path / shard):
            return members
    return {}


def _energon_meta(path: Path) -> dict[str, Any]:
    meta = path / META
    try:
        info = json.loads((meta / ".info.json").read_text())
        split = yaml.safe_load((meta / "split.yaml").read_text())
        dataset = yaml.safe_load((meta / "dataset.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: unreadable energon index ({exc}); re-run `energon prepare` "
                         "(or index_in_place for img2dataset tars)") from None
    # energon writes shard lists brace-collapsed ("{00000..00009}.tar"); expanded as it reads
    # them (megatron/energon/flavors/webdataset/metadata.py)
    parts = {name: [p for item in (names or []) for p in braceexpand(str(item))]
             for name, names in (split.get("split_parts") or {}).items()}
    exclude = [p for item in (split.get("exclude") or []) for p in braceexpand(str(item))]
    return {"counts": info["shard_counts"], "split_parts": parts, "exclude": exclude,
            "dataset": dataset or {}}


def _source_format(path: Path, meta: dict[str, Any], shards: list[str]) -> tuple[str, str]:
    """(source format, modality) of an energon dataset without ``mm_dataset.json``."""
    dataset = meta["dataset"]
    sample_type = (dataset.get("sample_type") or {}).get("__class__")
    if sample_type is not None:
        if sample_type not in TYPED_MODALITY or "field_map" not in dataset:
            raise ValueError(
                f"{path}: energon sample type {sample_type}"
                f"{'' if 'field_map' in dataset else ' with a sample_loader'} is not read in "
                f"place; prepare it as {' or '.join(sorted(TYPED_MODALITY))} with --field-map, "
                "or as CrudeWebdataset (interleaved layout in megatron_vlm/data/foreign.py)")
        return ENERGON_TYPED, TYPED_MODALITY[sample_type]
    if dataset.get("__class__") != "CrudeWebdataset":
        raise ValueError(f"{path}: energon dataset class {dataset.get('__class__')!r} is not "
                         "read in place (CaptioningSample, VQASample or CrudeWebdataset)")
    declared = (dataset.get("subflavors") or {}).get(SOURCE_FORMAT)
    if declared in (IMG2DATASET, ENERGON_INTERLEAVED):
        return declared, "image" if declared == IMG2DATASET else "interleaved"
    first = _first_sample(path, shards)
    if "json" in first and b'"sequence"' in first["json"]:
        return ENERGON_INTERLEAVED, "interleaved"
    if any(p in first for p in IMAGE_PARTS) and ("txt" in first or "json" in first):
        return IMG2DATASET, "image"
    raise ValueError(
        f"{path}: a CrudeWebdataset whose samples (members {sorted(first)}) are neither our "
        "canonical layout (it lacks mm_dataset.json), the interleaved layout (json with "
        "'sequence') nor img2dataset's (jpg|png|webp + txt)")


def _tar_idx_end(tar: Path) -> int | None:
    """Byte offset where the last sample ends, from energon's ``<tar>.idx`` (None: no index)."""
    idx = Path(f"{tar}.idx")
    if not idx.is_file() or idx.stat().st_size < 8:
        return None
    with open(idx, "rb") as f:
        f.seek(-8, os.SEEK_END)
        return struct.unpack("Q", f.read(8))[0]


def synthesize_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an energon dataset prepared elsewhere (no ``mm_dataset.json``).

    Splits, shards and sample counts come from energon's ``.nv-meta`` (``split.yaml``,
    ``.info.json``; excluded samples subtracted), the modality from the sample type, and
    ``source_format`` says how samples map to canonical records. Shard ``bytes`` is the end
    offset of the shard's last sample in energon's ``.tar.idx``.

    Raises:
        ValueError: Not an energon dataset, or one whose sample type is not read in place.
    """
    path = Path(dataset_dir)
    if not (path / META / ".info.json").is_file():
        raise ValueError(not_a_dataset_message(path))
    meta = _energon_meta(path)
    excluded: dict[str, int] = {}  # energon excludes whole shards or "<shard>/<key>" samples
    for item in map(str, meta["exclude"]):
        if item not in meta["counts"]:
            shard = item.rsplit("/", 1)[0]
            excluded[shard] = excluded.get(shard, 0) + 1
    splits: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        shards = []
        for rel in meta["split_parts"].get(split, []) or []:
            if rel in meta["exclude"]:
                continue
            samples = int(meta["counts"].get(rel, 0)) - excluded.get(rel, 0)
            shards.append({"path": rel, "samples": samples,
                           "bytes": _tar_idx_end(path / rel)})
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    all_shards = [s["path"] for sp in splits.values() for s in sp["shards"] if s["samples"]]
    source, modality = _source_format(path, meta, all_shards)
    manifest = {"format": FORMAT, "name": path.name, "modality": modality,
                SOURCE_FORMAT: source, "splits": splits}
    if source == ENERGON_TYPED:
        from megatron.energon.flavors.webdataset.field_access import split_field_access

        manifest["sample_type"] = meta["dataset"]["sample_type"]["__class__"]
        manifest["field_map_access"] = {k: split_field_access(v)
                                        for k, v in meta["dataset"]["field_map"].items()}
    return manifest


def verify_foreign(path: Path, manifest: dict[str, Any], deep: bool) -> None:
    """Check an energon dataset's tars against its energon index.

    Size mode: every tar exists and is at least as long as the end of its last sample in
    energon's ``.tar.idx`` (a tar cut short fails). Deep mode also reads every tar to its end and
    counts its samples against ``.info.json``; energon records no checksums, so content changed
    in place (same length) is not caught, unlike ``shards.verify_shards`` on our datasets.

    Raises:
        ShardVerificationError: Listing every bad shard.
    """
    problems = []
    counts = _energon_meta(path)["counts"] if deep else {}
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            tar = path / entry["path"]
            if not tar.is_file():
                problems.append(f"{entry['path']}: missing")
            elif entry["bytes"] is None:
                problems.append(f"{entry['path']}: no energon index {entry['path']}.idx")
            elif tar.stat().st_size < entry["bytes"]:
                problems.append(f"{entry['path']}: {tar.stat().st_size} bytes on disk, energon "
                                f"indexed samples up to byte {entry['bytes']} (truncated?)")
            elif deep:
                try:
                    num = sum(1 for _ in iter_shard(tar))
                except ShardVerificationError as exc:
                    problems.append(str(exc))
                    continue
                indexed = int(counts.get(entry["path"], 0))
                if num != indexed:
                    problems.append(f"{entry['path']}: {num} samples readable, energon "
                                    f"indexed {indexed}")
    if problems:
        raise ShardVerificationError(
            f"{len(problems)} bad shard(s) in {path}: " + "; ".join(problems)
            + ". Restore the tars, or re-index them (`energon prepare`, or index_in_place).")


def not_a_dataset_message(path: Path) -> str:
    return (f"{path} is neither a dataset prepared by tools/prepare_data.py (no "
            f"{MANIFEST_NAME}) nor an energon dataset (no {META}/.info.json); prepare it with "
            "tools/prepare_data.py, index energon WebDataset tars with `energon prepare`, or "
            "index img2dataset tars in place (foreign.index_in_place), or fix "
            "data.multimodal.root / data.multimodal.datasets")


def dataset_manifest(dataset_dir: str | os.PathLike, verify: str = "size") -> dict[str, Any]:
    """The manifest of any dataset the loader reads: ``mm_dataset.json`` for ours (checked by
    ``shards.verify_shards``), a synthesized one for energon/img2dataset directories.

    Args:
        dataset_dir: The dataset directory.
        verify: ``none`` | ``size`` | ``deep`` (see ``verify_shards`` / ``verify_foreign``).
    """
    path = Path(dataset_dir)
    if (path / MANIFEST_NAME).is_file():
        if verify == "none":
            return {SOURCE_FORMAT: CANONICAL, **load_manifest(path)}
        return {SOURCE_FORMAT: CANONICAL, **verify_shards(path, deep=verify == "deep")}
    manifest = synthesize_manifest(path)
    if verify != "none":
        verify_foreign(path, manifest, deep=verify == "deep")
    return manifest


# --------------------------------------------------------------------------------- indexing


def index_in_place(dataset_dir: str | os.PathLike, fmt: str = IMG2DATASET,
                   num_workers: int = 1) -> dict[str, Any]:
    """Index WebDataset tars where they lie so the loader trains on them without a copy.

    Runs what ``energon prepare DIR --split-parts 'train:.*' --sample-type CrudeWebdataset``
    runs (``megatron/energon/tools/prepare.py``: the tar glob of lines 285-286, the
    ``BaseWebdatasetFactory.prepare_dataset`` call of lines 356-368, the crude ``dataset.yaml``
    of lines 456-459) and adds the subflavor ``source_format: img2dataset`` that selects our
    cooker. Writes ``.nv-meta/`` and energon's ``<tar>.idx`` files; every tar is train.

    Args:
        dataset_dir: img2dataset's output folder (``*.tar`` with ``*.parquet`` / stats beside).
        fmt: ``img2dataset`` (the one layout indexed in place).
        num_workers: Processes indexing the tars.

    Returns:
        The synthesized manifest.

    Raises:
        ValueError: Another format, no tars, or tars not in img2dataset's layout.
    """
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    if fmt != IMG2DATASET:
        raise ValueError(f"index_in_place reads fmt='img2dataset' only, got {fmt!r}")
    path = Path(dataset_dir)
    tars = sorted(str(p.relative_to(path)) for p in path.glob("**/*.tar"))
    if not tars:
        raise ValueError(f"{path}: no .tar shards to index (img2dataset writes NNNNN.tar)")
    first = _first_sample(path, tars[:1])
    if not any(p in first for p in IMAGE_PARTS) or not ("txt" in first or "json" in first):
        raise ValueError(f"{path}/{tars[0]}: first sample has members {sorted(first)}, not "
                         f"img2dataset's {'|'.join(IMAGE_PARTS)} + txt + json")
    BaseWebdatasetFactory.prepare_dataset(path, tars, split_parts_patterns=[("train", ".*")],
                                          shuffle_seed=None, workers=num_workers)
    definition = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset",
                  "subflavors": {SOURCE_FORMAT: IMG2DATASET}}
    with open(path / META / "dataset.yaml", "w") as f:
        yaml.dump(definition, f, sort_keys=False)
    return synthesize_manifest(path)
