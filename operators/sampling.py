"""Which frames of a video to take: the sampling policies, as pure functions of the video's timeline.

No decoder is imported here, so the training side (`pipeline.dataset`'s frame budget) can use the same
uniform rule on machines without PyAV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


TIME_TOLERANCE_S = 1e-6  # a frame this close after a sampling time counts as on screen at it (rounding of k/fps)


class Timeline(Protocol):
    """What sampling needs to know of a video (`operators.decode.VideoInfo` is one)."""

    num_frames: int
    duration_s: float  # end of the last frame on the timeline (its start plus one frame period)
    timestamps_s: np.ndarray  # [num_frames] float64 presentation time of every frame, non-decreasing
    key_frame_indices: np.ndarray  # [k] int64 frames that are key frames (decodable without any other), increasing


@dataclass(frozen=True)
class FrameSampling:
    """Which frames to take: ``num_frames`` uniform over the video, or ``fps`` with an optional ``max_frames``.

    ``key_frames``: take, instead of each sampled frame, the key frame nearest to it in time that is
    nearer to it than to the frame taken for the sampled frame before it and than to the next sampled
    frame (so the frames keep their order and do not bunch up), within ``key_frame_tolerance_s`` seconds
    (default: no limit); the sampled frame itself when there is none. A key frame decodes alone,
    without decoding forward from the key frame before, which is what a sampled frame costs on H.264 with
    key frames seconds apart; the price is frames up to the tolerance (without one, up to halfway to the
    neighbouring frames) away from the sampled times. The rows record the frame actually taken: its own index and timestamp.
    """

    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int | None = None
    key_frames: bool = False
    key_frame_tolerance_s: float | None = None

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("set exactly one of num_frames and fps")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.key_frame_tolerance_s is not None and not self.key_frame_tolerance_s >= 0:
            raise ValueError(f"key_frame_tolerance_s must be >= 0, got {self.key_frame_tolerance_s}")
        if self.key_frame_tolerance_s is not None and not self.key_frames:
            raise ValueError("key_frame_tolerance_s is only used with key_frames")


def uniform_indices(length: int, count: int) -> np.ndarray:
    """``min(count, length)`` distinct indices into ``range(length)``, spread evenly, first and last
    included: ``linspace(0, length-1, count)`` rounded down (LLaVA-Video's frame sampling rule)."""
    return np.unique(np.linspace(0, length - 1, min(count, length)).astype(np.int64))


def sample_frame_indices(info: Timeline, sampling: FrameSampling) -> np.ndarray:
    """Frame numbers to decode, increasing and distinct.

    ``num_frames``: ``linspace(0, n-1, num_frames)`` rounded down (LLaVA-Video's rule; all frames when
    the video is shorter). ``fps``: for each time ``t0 + k/fps`` before the end (``t0``: the first
    frame's time, so a leading gap on the timeline is not sampled), the frame on screen then (the last
    one starting at or before it, within `TIME_TOLERANCE_S`), then ``max_frames`` uniformly among those.
    With ``key_frames``, each is then replaced by its nearest key frame where `FrameSampling` allows.
    """
    indices = _sampled(info, sampling)
    if sampling.key_frames:
        indices = nearest_key_frames(info, indices, sampling.key_frame_tolerance_s)
    return indices


def _sampled(info: Timeline, sampling: FrameSampling) -> np.ndarray:
    if sampling.num_frames is not None:
        return uniform_indices(info.num_frames, sampling.num_frames)
    start = float(info.timestamps_s[0])
    times = start + np.arange(0, max(1, int(np.ceil((info.duration_s - start) * sampling.fps)))) / sampling.fps
    times = times[(times < info.duration_s) | (times == start)]
    on_screen = np.searchsorted(info.timestamps_s, times + TIME_TOLERANCE_S, side="right") - 1
    indices = np.unique(np.clip(on_screen, 0, info.num_frames - 1)).astype(np.int64)
    if sampling.max_frames is not None and len(indices) > sampling.max_frames:
        indices = indices[uniform_indices(len(indices), sampling.max_frames)]
    return indices


def nearest_key_frames(info: Timeline, indices: np.ndarray, tolerance_s: float | None = None) -> np.ndarray:
    """``indices [n]`` (increasing sampled frames) with each replaced by the key frame nearest to it in time
    that is nearer to it than to the frame taken for the sampled frame before it and than to the next
    sampled frame (so frames keep their order and do not bunch up), and within ``tolerance_s`` seconds of
    it (None: no limit); the sampled frame itself when there is none. Taken left to right; returns
    ``[n]`` int64, increasing and distinct."""
    keys = np.asarray(info.key_frame_indices, dtype=np.int64)
    if not len(keys):
        return indices
    times = info.timestamps_s
    key_times = times[keys]
    limit = np.inf if tolerance_s is None else tolerance_s
    taken: list[int] = []
    for i, index in enumerate(indices.tolist()):
        time = times[index]
        before = times[taken[-1]] if taken else -np.inf  # the frame taken before
        after = times[indices[i + 1]] if i + 1 < len(indices) else np.inf  # the next sampled frame
        right = int(np.searchsorted(key_times, time))  # the first key frame at or after the sampled one
        candidates = [j for j in (right - 1, right) if 0 <= j < len(keys)
                      and abs(key_times[j] - time) < min(key_times[j] - before, after - key_times[j])
                      and abs(key_times[j] - time) <= limit]
        nearest = min(candidates, key=lambda j: (abs(key_times[j] - time), j), default=None)
        taken.append(int(keys[nearest]) if nearest is not None else index)
    return np.unique(np.asarray(taken, dtype=np.int64))
