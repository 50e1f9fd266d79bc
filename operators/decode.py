"""Video decoding with decord: probe once, then decode the sampled frames (`operators.sampling`) in
bounded segments.

decord applies the container's rotation (display matrix) itself, so frames come out upright and a
90°/270° video has its width and height swapped relative to the coded stream. It decodes straight
to a requested size (ffmpeg's scaler), so full-resolution frames never leave the decoder.

Damaged files: decord can often open a file whose later packets are broken (``corrupted.mp4``
decodes frames 0-26 of 50). `decode_segments` raises a `VideoDecodeError` naming the first failing
frame for the segment that holds it, and decodes nothing further. The job keeps a damaged video's
segments that decoded and records each failed segment's frames in its error table: a damaged tail
does not cost the good hour before it, and the error table says exactly which frames are missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
from decord import VideoReader, cpu


class MediaError(Exception):
    """An input that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class VideoDecodeError(MediaError):
    """A video decord cannot open, or one of whose sampled frames it cannot decode."""


@dataclass(frozen=True)
class VideoInfo:
    """What one probe learns about a video. ``width``/``height`` are upright (after rotation)."""

    path: str
    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    rotation: int  # degrees of the container's display rotation that decord applied (0, ±90, ±180)
    codec: str
    stream_index: int  # the video stream decoded (the container's "best" one, as ffmpeg picks it)
    timestamps_s: np.ndarray  # [num_frames] float64 presentation time of every frame, increasing


@dataclass(frozen=True)
class DecodedSegment:
    """Consecutive sampled frames of one video, decoded."""

    frames: np.ndarray  # [S, H, W, 3] uint8 RGB, upright, at the requested size
    frame_indices: np.ndarray  # [S] int64 frame number in the source video
    timestamps_s: np.ndarray  # [S] float64 presentation time


def _open(path: str, width: int = -1, height: int = -1) -> VideoReader:
    try:
        return VideoReader(path, ctx=cpu(0), width=width, height=height, num_threads=1)
    except Exception as error:  # decord raises RuntimeError or DECORDError with ffmpeg's text
        raise VideoDecodeError(path, f"cannot open video: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _stream_metadata(path: str) -> tuple[int, str, int]:
    """(rotation in degrees, codec name, stream index) of the best video stream, read from the headers."""
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                return 0, "unknown", -1
            rotation = 0
            for frame in container.decode(stream):
                rotation = int(round(frame.rotation))
                break
            return rotation, stream.codec_context.name, stream.index
    except (av.FFmpegError, StopIteration, ValueError):
        return 0, "unknown", -1


def probe_video(path: str) -> VideoInfo:
    """Open ``path`` once and read its frame count, rate, size, rotation and every frame's timestamp."""
    reader = _open(path)
    num_frames = len(reader)
    if num_frames == 0:
        raise VideoDecodeError(path, "the video stream has no frames")
    try:
        first = reader[0].shape  # (H, W, 3), upright
        spans = reader.get_frame_timestamp(np.arange(num_frames))  # [n, 2] start/end seconds
    except Exception as error:
        raise VideoDecodeError(path, f"cannot decode the first frame: {_first_line(error)}") from error
    rotation, codec, stream_index = _stream_metadata(path)
    return VideoInfo(
        path=path,
        num_frames=num_frames,
        fps=float(reader.get_avg_fps()),
        duration_s=float(spans[-1, 1]),
        width=int(first[1]),
        height=int(first[0]),
        rotation=rotation,
        codec=codec,
        stream_index=stream_index,
        timestamps_s=spans[:, 0].astype(np.float64),
    )


def decode_segments(
    path: str,
    frame_indices: np.ndarray,
    size: tuple[int, int] | None = None,
    segment_frames: int = 16,
) -> Iterator[DecodedSegment]:
    """Decode ``frame_indices`` ``segment_frames`` at a time; only one segment is in memory at once.

    Args:
        path: the video.
        frame_indices: increasing frame numbers (from `sample_frame_indices`).
        size: ``(width, height)`` to decode to (upright), or None for the source size.
        segment_frames: frames per segment.

    Raises:
        VideoDecodeError: the file cannot be opened or a frame cannot be decoded.
    """
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
    width, height = size if size is not None else (-1, -1)
    reader = _open(path, width, height)
    for start in range(0, len(frame_indices), segment_frames):
        indices = np.asarray(frame_indices[start : start + segment_frames], dtype=np.int64)
        try:
            frames = reader.get_batch(indices.tolist()).asnumpy()  # [S, H, W, 3] uint8
            timestamps = reader.get_frame_timestamp(indices)[:, 0].astype(np.float64)
        except Exception as error:
            failing = _first_failing_frame(reader, indices)
            raise VideoDecodeError(
                path, f"frame {failing} of {len(reader)} cannot be decoded: {_first_line(error)}"
            ) from error
        yield DecodedSegment(frames=frames, frame_indices=indices, timestamps_s=timestamps)


def _first_failing_frame(reader: VideoReader, indices: np.ndarray) -> int:
    for index in indices.tolist():
        try:
            reader[index]
        except Exception:
            return index
    return int(indices[0])
