"""One input (video or image) → its model-ready frame rows: probe, sample, decode at the model's size, crop/pad
or AnyRes-tile. Everything one input costs in CPU happens here, from one open of the file, streaming: a
frame's row is yielded as soon as it is decoded, so memory does not grow with the video's length.

The rows are plain dicts (``kind`` says which):

* ``{"kind": "source", "source_info": {...}, "todo": [...], "sampled": [...]}`` first, once the input is
  probed: what the shards record per input (`VideoInfo.summary` plus ``sampled_frames``; for images the
  format and size), the frame numbers that will follow (sampled, minus ``skip_frames``) and all the
  sampled frame numbers (which frames are neighbours in the sampling).
* ``{"kind": "frame", "frame_index", "timestamp_s", "grid_rows", "grid_cols", "pixels"}`` per frame,
  ``pixels [T, S, S, 3]`` uint8 (T views, the global view first).
* ``{"kind": "error", "error_type", "error_message", "failed_frames"}`` for what failed: the whole input
  (``failed_frames`` empty) or a run of sampled frames that cannot be decoded.

Only `MediaError` (the input's own fault) becomes an error row; any other exception propagates, so the
job can tell a bad file from a fault of the machine or of this code.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from operators.decode import DEFAULT_MAX_FRAME_PIXELS, FrameError, VideoReader
from operators.errors import MediaError
from operators.images import DEFAULT_MAX_PIXELS, image_format, load_image
from operators.preprocess import Preprocessing
from operators.sampling import FrameSampling, sample_frame_indices
from operators.tiles import DEFAULT_PINPOINTS, anyres_decode_size, anyres_tiles


@dataclass(frozen=True)
class FrameRequest:
    """What to make of one input. ``frames`` (explicit frame numbers) replaces ``sampling`` when set;
    ``skip_frames`` are sampled frames an earlier run already committed (in shards or errors)."""

    path: str
    media: str = "video"
    sampling: FrameSampling = FrameSampling()
    frames: tuple[int, ...] | None = None
    skip_frames: frozenset[int] = field(default_factory=frozenset)
    preprocessing: Preprocessing = Preprocessing()
    anyres: bool = False
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS


def frame_rows(request: FrameRequest) -> Iterator[dict]:
    """The rows of one input (see the module docstring). Raises only what is not the input's fault."""
    try:
        if request.media == "image":
            yield from _image_rows(request)
        else:
            yield from _video_rows(request)
    except MediaError as error:
        yield error_row(type(error).__name__, error.reason)


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


def _image_rows(request: FrameRequest) -> Iterator[dict]:
    image = load_image(request.path, request.max_image_pixels)
    height, width = image.shape[:2]
    yield {"kind": "source", "source_info": {"codec": image_format(request.path), "width": width, "height": height,
                                              "num_frames": 1, "sampled_frames": 1, "time_source": "none"},
           "todo": [0], "sampled": [0]}
    yield {"kind": "frame", "frame_index": 0, "timestamp_s": 0.0, **_Views(request)(image, (width, height))}


def _video_rows(request: FrameRequest) -> Iterator[dict]:
    views = _Views(request)
    with VideoReader(request.path, max_pixels=request.max_frame_pixels) as reader:
        info = reader.info
        sampled = np.asarray(request.frames if request.frames is not None else sample_frame_indices(info, request.sampling),
                             dtype=np.int64)
        if not len(sampled):
            raise MediaError(request.path, f"the sampling {request.sampling} selects no frame of {info.num_frames}")
        todo = np.array([i for i in sampled.tolist() if i not in request.skip_frames], dtype=np.int64)
        yield {"kind": "source", "source_info": {**info.summary(), "sampled_frames": len(sampled)},
               "todo": todo.tolist(), "sampled": sampled.tolist()}
        source_size = (info.width, info.height)
        failed: list[FrameError] = []
        for decoded in reader.frames(todo, views.decode_size):
            if isinstance(decoded, FrameError):
                failed.append(decoded)
                continue
            yield from _failure_rows(failed)
            failed = []
            yield {"kind": "frame", "frame_index": decoded.index, "timestamp_s": decoded.timestamp_s,
                   **views(decoded.pixels, source_size)}
        yield from _failure_rows(failed)
        if info.unreadable_tail:  # frames past the damage are not even numbered: the whole tail is lost
            yield error_row("TruncatedVideo", info.unreadable_tail)


def _failure_rows(failed: list[FrameError]) -> Iterator[dict]:
    """One error row per run of consecutive failed sampled frames with the same reason."""
    for reason, group in itertools.groupby(failed, key=lambda f: f.reason):
        frames = [f.index for f in group]
        yield error_row("FrameDecodeError", f"{frame_span(frames)}: {reason}", frames)


def frame_span(frames: list[int]) -> str:
    """``frame 7`` or ``frames 28-49 (4 sampled)``: how error messages name a run of sampled frames."""
    return f"frame {frames[0]}" if len(frames) == 1 else f"frames {frames[0]}-{frames[-1]} ({len(frames)} sampled)"
