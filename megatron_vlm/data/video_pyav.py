"""Sparse sampled decoding with PyAV: only the frames the sampled ones depend on are decoded.

``video.decode_video`` samples a few frames of many (2 fps of a 30 fps source keeps 1 in 15). A
plain decoder decodes every frame up to the last sampled one; this one decodes less, with the
same pixels for every frame it returns:

- **Non-reference frames are skipped** (``skip_frame = "NONREF"``) unless they are sampled: no
  other frame is predicted from them, so the reference frames -- and hence every sampled frame --
  decode bit for bit as in a full decode (H.264 with B-frames: roughly a third of the frames).
- **Seeking**: the sampled frames are grouped by the last keyframe at or before them (in
  presentation order); a group starts with a seek to its keyframe, so the frames between the last
  sampled frame of one group and the next group's keyframe are never decoded (short GOPs, e.g.
  one keyframe a second or all-intra footage; with x264's default of 250 frames there is nothing
  to skip at 2 fps and the decode runs forward).

Frames are identified by their presentation timestamp: sampled frame ``i`` is the one shown at
the ``i``-th smallest packet timestamp of the stream (``video.VideoTiming.frame_pts``), which is
the ``i``-th frame out of a full decode. A frame that does not show up where the index says
(a seek that lands late, a decoder that drops it) makes ``decode_sampled`` return None and the
caller decodes in order instead.
"""

from __future__ import annotations

import bisect

import numpy as np


def decode_sampled(container, stream, indices: np.ndarray, frame_pts: tuple[int, ...],
                   keyframe_pts: tuple[int, ...]) -> list[np.ndarray] | None:
    """RGB frames ``[H, W, 3]`` of the sampled ``indices`` of an open PyAV stream, or None when
    the stream's index cannot place them (the caller then decodes in order).

    Args:
        container: An open ``av`` input container (not yet decoded from).
        stream: Its video stream.
        indices: Increasing frame indices (presentation order).
        frame_pts: Sorted presentation timestamps of every frame of the stream.
        keyframe_pts: Sorted presentation timestamps of the keyframes.
    """
    if not len(indices) or int(indices[-1]) >= len(frame_pts) or not keyframe_pts:
        return None
    wanted = [frame_pts[int(i)] for i in indices]
    groups: list[tuple[int, list[int]]] = []  # (keyframe pts, wanted pts decoded from it)
    for pts in wanted:
        k = bisect.bisect_right(keyframe_pts, pts) - 1
        if k < 0:  # a sampled frame before the first keyframe: only an in-order decode has it
            return None
        if groups and groups[-1][0] == keyframe_pts[k]:
            groups[-1][1].append(pts)
        else:
            groups.append((keyframe_pts[k], [pts]))
    found: dict[int, np.ndarray] = {}
    codec = stream.codec_context
    try:
        for n, (key, group) in enumerate(groups):
            if n or key != keyframe_pts[0]:  # a fresh container starts at the first keyframe
                container.seek(key, stream=stream, backward=True, any_frame=False)
            if not _decode_group(container, stream, codec, set(group), max(group), found):
                return None
    finally:
        codec.skip_frame = "DEFAULT"
    return [found[pts] for pts in wanted]


def _decode_group(container, stream, codec, want: set[int], last: int,
                  found: dict[int, np.ndarray]) -> bool:
    """Decode forward until every frame shown at ``want`` is in ``found`` (True), or a frame
    after ``last`` or the end of the stream comes first (False)."""
    for packet in container.demux(stream):
        # The skip applies to the picture this packet holds; a sampled one is always decoded.
        codec.skip_frame = "DEFAULT" if packet.pts in want else "NONREF"
        for frame in codec.decode(packet):
            if frame.pts in want:
                found[frame.pts] = frame.to_ndarray(format="rgb24")
                want.discard(frame.pts)
                if not want:
                    return True
            elif frame.pts is not None and frame.pts > last:
                return False  # shown after the last sampled frame: one went missing
    return not want
