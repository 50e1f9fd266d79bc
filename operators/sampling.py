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


@dataclass(frozen=True)
class FrameSampling:
    """Which frames to take: ``num_frames`` uniform over the video, or ``fps`` with an optional ``max_frames``."""

    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("set exactly one of num_frames and fps")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


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
    """
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
