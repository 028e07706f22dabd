"""Clip spans stored as stream-copied segments (Panda-70M: ~18 captioned spans per source video).

A span ``[start_s, end_s]`` of a source video is stored as only the packets that decode it, copied
without re-encoding (PyAV remux): from the last keyframe at or before the span's first frame
through the end of the GOP that holds its last frame (every frame in the span decodes, B-frame
reordering included), packet timestamps rebased so the segment starts at 0, in the source's
container format (mp4 -> mp4, mov -> mov, mkv -> mkv, webm -> webm).

Frame arithmetic (``video.clip_frame_range``): decoders number frames in presentation order and
time frame ``i`` at ``i / fps``. The segment holds the source frames ``seg_first ..`` (its first
frame is the keyframe's), so the span inside the segment is ``[start_s - seg_first / fps,
end_s - seg_first / fps]`` and it selects the same source frames when the segment's average frame
rate equals the source's (checked on the written segment). Boundaries are picked from packet pts
in the stream time base; the rebased clip is then checked with ``clip_frame_range`` and, should
float rounding move a boundary frame, replaced by the mid-frame bounds ``(k - 0.5) / fps`` (half
a frame from any frame time, so no rounding can move them). Timestamps derived from the segment
(``index / fps``, printed in prompts) count from the segment's first frame.

``cut_clip`` returns None -- store the whole file with the clip unchanged -- when a remux is not
possible or not useful: no video stream, a container we do not remux (avi, anything but
mp4/mov/mkv/webm), broken or missing packet timestamps (``video.read_timing`` repairs those by
decoding in order), no keyframe at or before the span, a source whose presentation order has gaps,
a muxer error, a segment whose frame count or frame rate differs from what the source promises,
or a span whose GOPs cover the whole file.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import os
from dataclasses import dataclass

from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.video import Clip, VideoSource, clip_frame_range

MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm"}
"""Extension of a source -> the FFmpeg muxer its segments are written with."""


@dataclass(frozen=True)
class PacketIndex:
    """The video packets of a source in decode order (a demux, no decoding)."""

    pts: tuple[int, ...]
    """Presentation timestamps in the stream time base."""
    keyframe: tuple[bool, ...]
    fps: float
    """The rate decoders time frames by (``average_rate``, else ``guessed_rate``)."""

    @property
    def total_frames(self) -> int:
        return len(self.pts)

    @functools.cached_property
    def ordered(self) -> list[int]:
        """``pts`` in presentation order: frame ``i`` is shown at ``ordered[i]``."""
        return sorted(self.pts)

    @functools.cached_property
    def keyframes(self) -> tuple[list[int], list[int], list[int]]:
        """Keyframes by pts: (their pts, the latest decode position among keyframes with pts up
        to each, their decode positions in order)."""
        keys = sorted((self.pts[p], p) for p in range(len(self.pts)) if self.keyframe[p])
        latest = list(itertools.accumulate((p for _, p in keys), max))
        return [t for t, _ in keys], latest, sorted(p for _, p in keys)

    @functools.cached_property
    def suffix_min(self) -> list[int]:
        """Least pts from each decode position on: a cut there loses no frame before it."""
        out = list(self.pts)
        for p in range(len(out) - 2, -1, -1):
            out[p] = min(out[p], out[p + 1])
        return out


def _open(source: VideoSource) -> str | io.BytesIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return os.fspath(source)


def packet_index(source: VideoSource) -> PacketIndex | None:
    """The packet index of a video's first stream; None when it cannot be cut (see the module
    docstring): no stream or rate, missing or repeated pts, a header frame count that disagrees."""
    try:
        import av

        with av.open(_open(source)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            header_frames = int(stream.frames)
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    except Exception:  # av.error.* on damaged input, ImportError: store the whole file
        return None
    pts = [p for p, _ in packets]
    if (not pts or fps <= 0 or None in pts or len(set(pts)) < len(pts)
            or (header_frames > 0 and header_frames != len(pts))):
        return None
    return PacketIndex(pts=tuple(pts), keyframe=tuple(k for _, k in packets), fps=fps)


@dataclass(frozen=True)
class _Plan:
    start: int
    """Decode-order position of the segment's keyframe."""
    stop: int
    """Decode-order position after the segment's last packet."""
    positions: tuple[int, ...]
    """Positions copied (leading pictures before the keyframe's pts dropped)."""
    seg_first: int
    """Source frame index of the segment's first frame."""


def _plan(index: PacketIndex, first: int, end: int) -> _Plan | None:
    """Packets that decode source frames ``[first, end)``; None if no keyframe precedes them
    or the segment's frames would not be consecutive source frames."""
    pts, ordered, suffix_min = index.pts, index.ordered, index.suffix_min
    key_pts, latest, key_positions = index.keyframes
    lo, hi = ordered[first], ordered[end - 1]
    below = bisect.bisect_right(key_pts, lo)
    if below == 0:
        return None
    start = latest[below - 1]  # the last keyframe (decode order) shown at or before the span
    after = key_positions[bisect.bisect_right(key_positions, start):]
    stop = next((p for p in after if suffix_min[p] > hi), len(pts))
    positions = tuple(p for p in range(start, stop) if pts[p] >= pts[start])
    seg_first = bisect.bisect_left(ordered, pts[start])
    if sorted(pts[p] for p in positions) != ordered[seg_first:seg_first + len(positions)]:
        return None
    return _Plan(start=start, stop=stop, positions=positions, seg_first=seg_first)


def rebased_clip(clip: Clip, fps: float, first: int, end: int, seg_first: int,
                 seg_frames: int) -> Clip | None:
    """The span inside a segment whose first frame is source frame ``seg_first``: selects the
    segment frames ``[first - seg_first, end - seg_first)`` by ``clip_frame_range``.

    ``[start_s - seg_first / fps, end_s - seg_first / fps]`` (start clamped at 0) unless float
    rounding moves a boundary frame; then the mid-frame bounds ``(k - 0.5) / fps``.
    """
    want = (first - seg_first, end - seg_first)
    offset = seg_first / fps
    exact = (max(0.0, clip[0] - offset), clip[1] - offset)
    nudged = (max(0.0, (want[0] - 0.5) / fps), (want[1] - 0.5) / fps)
    for candidate in (exact, nudged):
        try:
            if clip_frame_range(seg_frames, fps, candidate) == want:
                return candidate
        except BadSampleError:
            continue
    return None


def _remux(source: VideoSource, muxer: str, index: PacketIndex, plan: _Plan) -> bytes | None:
    """Stream-copy the planned packets into a new container, pts/dts shifted by the keyframe's
    pts; None on any demuxer/muxer error or a packet that is not the one indexed."""
    import av

    keep = set(plan.positions)
    key_pts = index.pts[plan.start]
    out_buf = io.BytesIO()
    try:
        with av.open(_open(source)) as container:
            stream = container.streams.video[0]
            container.seek(key_pts, stream=stream, backward=True, any_frame=False)
            position = None
            with av.open(out_buf, "w", format=muxer) as out:
                out_stream = out.add_stream_from_template(stream)
                for packet in container.demux(stream):
                    if not packet.size:
                        continue
                    if position is None:  # the seek lands on or before the keyframe
                        if packet.pts != key_pts or not packet.is_keyframe:
                            continue
                        position = plan.start
                    if position >= plan.stop:
                        break
                    if packet.pts != index.pts[position]:
                        return None
                    if position in keep:
                        packet.pts -= key_pts
                        if packet.dts is not None:
                            packet.dts -= key_pts
                        packet.stream = out_stream
                        out.mux(packet)
                    position += 1
            if position is None or position < plan.stop:
                return None
    except Exception:  # av.error.* from the demuxer or muxer: store the whole file
        return None
    return out_buf.getvalue()


def cut_clip(source: VideoSource, ext: str, clip: Clip,
             index: PacketIndex | None = None) -> tuple[bytes, Clip] | None:
    """The segment of ``source`` that decodes ``clip``, and the clip inside it.

    Args:
        source: The video's path or bytes.
        ext: Its canonical extension (``mp4``, ``mkv``, ...): the segment's container.
        clip: ``(start_s, end_s)`` in the source's frame times (``index / fps``).
        index: ``packet_index(source)`` when the caller caches it (many spans per file).

    Returns:
        ``(segment bytes, (start_s, end_s) in the segment)``, or None: store the whole file with
        ``clip`` unchanged (see the module docstring for when).
    """
    muxer = MUXERS.get(ext)
    if muxer is None:
        return None
    index = packet_index(source) if index is None else index
    if index is None:
        return None
    try:
        first, end = clip_frame_range(index.total_frames, index.fps, clip)
    except BadSampleError:  # no frame in the span: the decode-time check rejects it
        return None
    plan = _plan(index, first, end)
    if plan is None or len(plan.positions) == index.total_frames:
        return None
    new_clip = rebased_clip(clip, index.fps, first, end, plan.seg_first, len(plan.positions))
    if new_clip is None:
        return None
    data = _remux(source, muxer, index, plan)
    if data is None:
        return None
    written = packet_index(data)
    if (written is None or written.total_frames != len(plan.positions)
            or written.fps != index.fps):
        return None
    return data, new_clip
