"""One input (video or image) → its model-ready frames: probe, sample, decode at the model's size, crop/pad or
AnyRes-tile. Everything one input costs in CPU happens here, from one open of the file, streaming: a
frame is yielded as soon as it is decoded, so memory does not grow with the video's length.

`open_input` opens an input once (`InputSource`: what the shards record of it, and its sampled frames);
`InputSource.rows` then decodes the frames asked for. The rows are plain dicts (``kind`` says which):

* ``{"kind": "frame", "frame_index", "timestamp_s", "grid_rows", "grid_cols", "pixels"}`` per frame,
  ``pixels [T, S, S, 3]`` uint8 (T views, the global view first).
* ``{"kind": "error", "error_type", "error_message", "failed_frames"}`` for a run of sampled frames that
  cannot be decoded (``failed_frames``), or, from `frame_rows`, for the whole input (empty).

Only `MediaError` (the input's own fault) is the input's error; any other exception propagates, so the
job can tell a bad file from a fault of the machine or of this code.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from operators.decode import DEFAULT_MAX_FRAME_PIXELS, FrameError, VideoReader
from operators.errors import MediaError
from operators.images import DEFAULT_MAX_PIXELS, image_format, load_image
from operators.preprocess import Preprocessing
from operators.sampling import FrameSampling, sample_frame_indices
from operators.tiles import DEFAULT_PINPOINTS, anyres_decode_size, anyres_tiles
from operators.timeline import Progress, no_progress


@dataclass(frozen=True)
class FrameRequest:
    """What to make of one input. ``frames`` (explicit frame numbers) replaces ``sampling`` in `frame_rows`."""

    path: str
    media: str = "video"
    sampling: FrameSampling = FrameSampling()
    frames: tuple[int, ...] | None = None
    preprocessing: Preprocessing = Preprocessing()
    anyres: bool = False
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS


def error_row(error_type: str, message: str, frames=()) -> dict:
    """An error row: the whole input when ``frames`` is empty, else those sampled frames."""
    return {"kind": "error", "error_type": error_type, "error_message": message, "failed_frames": [int(i) for i in frames]}


class _Views:
    """A frame (``[H, W, 3]`` uint8, upright) → its ``[T, S, S, 3]`` uint8 views and grid."""

    def __init__(self, request: FrameRequest) -> None:
        self.request = request
        self.preprocessing = request.preprocessing

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The size to have the decoder scale a ``width``×``height`` frame to."""
        if self.request.anyres:
            return anyres_decode_size(width, height, self.request.pinpoints)
        return self.preprocessing.decode_size(width, height)

    def __call__(self, frame: np.ndarray, source_size: tuple[int, int]) -> dict:
        if self.request.anyres:
            tiles = anyres_tiles(frame, self.preprocessing.image_size, self.request.pinpoints, source_size=source_size)
            pixels, rows, cols = tiles.pixels.numpy(), tiles.grid_rows, tiles.grid_cols
        else:
            pixels, rows, cols = self.preprocessing.square(frame[None]).numpy(), 1, 1
        return {"grid_rows": rows, "grid_cols": cols, "pixels": np.ascontiguousarray(pixels)}


class InputSource:
    """An opened input: ``source_info`` (what the shards record per input: `operators.timeline.VideoInfo.summary`
    plus ``sampled_frames``; for images the format and size) and ``sampled`` (``[n]`` int64, the frames its
    sampling selects, increasing)."""

    def __init__(self, request: FrameRequest, reader: VideoReader | None, image: np.ndarray | None) -> None:
        self.request = request
        self._reader = reader
        self._image = image
        self._views = _Views(request)
        if reader is not None:
            info = reader.info
            self.sampled = np.asarray(sample_frame_indices(info, request.sampling), dtype=np.int64)
            if not len(self.sampled):
                raise MediaError(request.path, f"the sampling {request.sampling} selects no frame of {info.num_frames}")
            self.source_info = {**info.summary(), "sampled_frames": len(self.sampled)}
        else:
            height, width = image.shape[:2]
            self.sampled = np.zeros(1, dtype=np.int64)
            self.source_info = {"codec": image_format(request.path), "width": width, "height": height,
                                "num_frames": 1, "sampled_frames": 1, "time_source": "none"}

    def rows(self, frames: np.ndarray) -> Iterator[dict]:
        """The ``frame`` rows of ``frames`` (increasing frame numbers), and an ``error`` row per run of
        consecutive frames that cannot be decoded with the same reason."""
        if self._reader is None:
            if len(frames):
                height, width = self._image.shape[:2]
                yield {"kind": "frame", "frame_index": 0, "timestamp_s": 0.0, **self._views(self._image, (width, height))}
            return
        info = self._reader.info
        source_size = (info.width, info.height)
        failed: list[FrameError] = []
        for decoded in self._reader.frames(np.asarray(frames, dtype=np.int64), self._views.decode_size):
            if isinstance(decoded, FrameError):
                failed.append(decoded)
                continue
            yield from _failure_rows(failed)
            failed = []
            yield {"kind": "frame", "frame_index": decoded.index, "timestamp_s": decoded.timestamp_s,
                   **self._views(decoded.pixels, source_size)}
        yield from _failure_rows(failed)


@contextlib.contextmanager
def open_input(request: FrameRequest, progress: Progress = no_progress) -> Iterator[InputSource]:
    """Open ``request.path`` once: probe and sample a video, or load an image. ``progress`` is called as the
    video's packets are read and decoded (`operators.decode.VideoReader`).

    Raises:
        MediaError: the input cannot be opened or decoded, or its sampling selects no frame.
    """
    if request.media == "image":
        yield InputSource(request, None, load_image(request.path, request.max_image_pixels))
        return
    with VideoReader(request.path, max_pixels=request.max_frame_pixels, progress=progress) as reader:
        yield InputSource(request, reader, None)


def frame_rows(request: FrameRequest, progress: Progress = no_progress) -> Iterator[dict]:
    """One input's rows without a plan: ``{"kind": "source", "source_info", "sampled"}``, then the rows of
    ``request.frames`` (default: every sampled frame); a `MediaError` is one whole-input ``error`` row.
    Raises only what is not the input's fault."""
    try:
        with open_input(request, progress) as source:
            yield {"kind": "source", "source_info": source.source_info, "sampled": source.sampled.tolist()}
            frames = source.sampled if request.frames is None else np.asarray(request.frames, dtype=np.int64)
            yield from source.rows(frames)
    except MediaError as error:
        yield error_row(type(error).__name__, error.reason)


def _failure_rows(failed: list[FrameError]) -> Iterator[dict]:
    """One error row per run of consecutive failed sampled frames with the same reason."""
    for reason, group in itertools.groupby(failed, key=lambda f: f.reason):
        frames = [f.index for f in group]
        yield error_row("FrameDecodeError", f"{frame_span(frames)}: {reason}", frames)


def frame_span(frames: list[int]) -> str:
    """``frame 7`` or ``frames 28-49 (4 sampled)``: how error messages name a run of sampled frames."""
    return f"frame {frames[0]}" if len(frames) == 1 else f"frames {frames[0]}-{frames[-1]} ({len(frames)} sampled)"
