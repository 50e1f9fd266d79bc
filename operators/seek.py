"""Where to seek, and which targets to decode in one pass: pure planning over a timeline's key frames
(`operators.timeline.Timeline.keys`, ``[k, 2]`` int64 (pts, dts) sorted by pts), testable without FFmpeg.

Targets are decoded in *runs*: one seek, then decoding on to each next target of the run, which is
cheaper than a seek unless a key frame lies between the two (or they share a pts: a second frame of
the same pts is found again from a seek).
"""

from __future__ import annotations

import numpy as np

SEEK_KEY_FRAMES = 3  # key frames tried (each earlier than the last) before decoding from the stream's start


def key_after(keys: np.ndarray, previous: int, target: int) -> bool:
    """Whether a key frame lies after pts ``previous`` and at or before pts ``target``."""
    pts = keys[:, 0]
    return bool(np.searchsorted(pts, target, side="right") > np.searchsorted(pts, previous, side="right"))


def run_starts(targets: list[int], keys: np.ndarray) -> list[bool]:
    """For each target pts (in decoding order of the targets), whether it starts a run (a seek)."""
    return [i == 0 or target == targets[i - 1] or key_after(keys, targets[i - 1], target)
            for i, target in enumerate(targets)]


def run_ends(starts: list[bool]) -> list[int]:
    """For each target, the index past the last target of its run (``starts``: `run_starts`)."""
    ends = [0] * len(starts)
    end = len(starts)
    for i in reversed(range(len(starts))):
        ends[i] = end
        if starts[i]:
            end = i
    return ends


def seek_positions(keys: np.ndarray, target: int) -> list[int]:
    """Where to seek for pts ``target``, in the order tried: the last key frame at or before it by its pts
    (MP4, Matroska index by it), then by its dts (MPEG-TS seeks by dts: a pts lands a key frame late), then
    up to `SEEK_KEY_FRAMES` earlier key frames likewise, then the stream's start. A position that lands
    after the target is detected by the decoder (the first frame is later than it) and the next is tried."""
    positions = []
    for pts, dts in keys[keys[:, 0] <= target][::-1][:SEEK_KEY_FRAMES].tolist():
        positions += [pts] if pts == dts else [pts, dts]
    positions.append(int(keys[:, 1].min()) if len(keys) else 0)
    return list(dict.fromkeys(positions))
