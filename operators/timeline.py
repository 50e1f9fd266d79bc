"""A video's **presented-frame timeline**: the frames a player shows, in the order it shows them, at the
times it shows them, built from one demux pass over the video stream's packets (no payload decoded but
the first picture).

* ``frame_index`` k is the k-th presented frame: packets the container's edit list hides (FFmpeg flags
  them *discard*) are not frames; the rest, sorted by pts, are. ``0 <= k < num_frames``.
* ``timestamp_s`` is the frame's pts minus the container's start time (``AVFormatContext.start_time``),
  in seconds: an MPEG-TS whose clock starts at 1.48 s shows its first frame at 0.0; a video track that
  starts 2 s after its audio keeps its 2 s.
* AVI stores no presentation timestamps (FFmpeg guesses them, off by one with B-frames), and a stream
  may lack them: then frame k is the k-th frame decoded in order and its time is ``k / frame rate``
  (``VideoInfo.time_source == "frame_rate"``).

`build_timeline` is the pure rule (packets in, timeline out; testable without FFmpeg); `probe` runs the
demux pass that feeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np

from operators.errors import VideoDecodeError, first_line

FRAME_ORDER_FORMATS = ("avi",)  # containers that store no presentation timestamps
# containers whose seeks land on pictures stamped with another picture's pts (MPEG-PS): decoded from the start
NO_SEEK_FORMATS = ("mpeg",)

Packet = tuple[int | None, int | None, bool, bool]  # (pts, dts, key, discard), in demux order
Progress = Callable[[], None]  # called as the probe and the decoder move on (a packet read or decoded)


def no_progress() -> None:
    """The default `Progress`: nobody is watching."""


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learns about a video. ``width``/``height`` are upright (after rotation)."""

    path: str
    num_frames: int  # presented frames
    fps: float  # the stream's average frame rate (0.0 when the container does not say)
    duration_s: float  # end of the last presented frame on the timeline (its start plus one frame)
    width: int
    height: int
    rotation: int  # degrees counter-clockwise the display matrix turns the coded picture, to a quarter turn (0, ±90, 180)
    codec: str
    stream_index: int  # the video stream decoded (FFmpeg's "best" video stream)
    timestamps_s: np.ndarray  # [num_frames] float64 presentation time of every frame, non-decreasing
    time_source: Literal["pts", "frame_rate"]  # where the timestamps come from (see the module docstring)
    key_frame_indices: np.ndarray  # [k] int64 presented frames that are key frames (empty: frame-order streams)
    unreadable_tail: str | None = None  # why the container could not be read to its end (frames beyond are lost)

    def summary(self) -> dict:
        """The probe without the per-frame times: what the shards record per video."""
        return {
            "codec": self.codec,
            "stream_index": self.stream_index,
            "rotation": self.rotation,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "time_source": self.time_source,
            "unreadable_tail": self.unreadable_tail,
        }


@dataclass(frozen=True)
class Timeline:
    """The presented frames of a stream, from its packets (`build_timeline`)."""

    pts: np.ndarray  # [n] int64 pts of each presented frame, sorted (frame-order streams: 0..n-1)
    timestamps_s: np.ndarray  # [n] float64 presentation times, seconds
    keys: np.ndarray  # [k, 2] int64 (pts, dts) of the key frames a seek may go to; empty: never seek
    key_frame_indices: np.ndarray  # [k'] int64 presented frames that are key frames
    time_source: Literal["pts", "frame_rate"]


def shown_packets(packets: list[Packet]) -> list[Packet]:
    """The packets a player shows: not discarded, from the first key frame in decoding order on, and not
    placed before that key frame. Without any key-frame flag, all that are not discarded."""
    first_key = next((i for i, (_, _, key, _) in enumerate(packets) if key), None)
    if first_key is None:
        return [p for p in packets if not p[3]]
    key_pts = packets[first_key][0]
    return [p for p in packets[first_key:]
            if not p[3] and not (key_pts is not None and p[0] is not None and p[0] < key_pts)]


def build_timeline(packets: list[Packet], format_name: str, fps: float, time_base: float,
                   start_time_us: int | None) -> Timeline:
    """The presented frames of a stream whose packets, in demux order, are ``packets``.

    Args:
        format_name: the container's FFmpeg format name (``avi``, ``mpeg``, ``mov,mp4,...``).
        fps: the stream's average frame rate (0.0: unknown).
        time_base: seconds per pts unit.
        start_time_us: the container's start time in microseconds (None: the first frame's pts).

    Raises:
        VideoDecodeError: (path "") no packet is shown, or a frame-order stream has no frame rate.
    """
    shown = shown_packets(packets)
    if not shown:
        raise VideoDecodeError("", "the video stream has no frames")
    pts = [p[0] for p in shown]
    dts = [p[1] for p in packets if p[1] is not None]
    # AVI stores no pts; a stream may lack some; a concatenated stream's clock jumps back (dts decrease):
    # in all three the frames' order is their decoding order and their time k / fps.
    if (format_name in FRAME_ORDER_FORMATS or any(p is None for p in pts)
            or any(b < a for a, b in zip(dts, dts[1:]))):
        if not fps:
            raise VideoDecodeError("", "the stream has neither usable presentation timestamps nor a frame rate")
        order = np.arange(len(pts), dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        return Timeline(order, order / fps, np.zeros((0, 2), dtype=np.int64), empty, "frame_rate")
    timeline = np.sort(np.asarray(pts, dtype=np.int64))
    origin = start_time_us / 1e6 if start_time_us is not None else timeline[0] * time_base
    times = timeline * time_base - origin
    # where to seek for a key frame: demuxers seek by pts (MP4, Matroska) or dts (MPEG-TS); dts <= pts
    keys = np.unique(np.array([(p, d if d is not None else p) for p, d, key, _ in packets if key and p is not None],
                              dtype=np.int64).reshape(-1, 2), axis=0)
    if format_name in NO_SEEK_FORMATS:
        keys = keys[:0]  # one pass from the start (the stream's start is the one position sought)
    shown_keys = np.unique(np.searchsorted(timeline, keys[np.isin(keys[:, 0], timeline), 0]))
    return Timeline(timeline, times.astype(np.float64), keys, shown_keys.astype(np.int64), "pts")


def quarter_turns(degrees: float | None) -> int:
    """A display rotation as quarter turns counter-clockwise in -1..2 (the nearest; pictures are only
    ever turned by quarter turns)."""
    turns = int(round((degrees or 0.0) / 90.0)) % 4
    return turns - 4 if turns == 3 else turns


def ffmpeg_reason(error: BaseException) -> str:
    """FFmpeg's message without the errno number, or the first line of any other error."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror[:300]
    return first_line(error)


def probe(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str,
          progress: Progress = no_progress) -> tuple[VideoInfo, Timeline]:
    """Demux every packet of ``stream`` (decoding only up to the first picture) → its `VideoInfo` and
    `Timeline`. ``progress`` is called once per packet read.

    Shown frames: the packets the edit list does not hide (FFmpeg's *discard* flag), from the first
    key frame on (a stream joined mid-GOP starts with pictures that cannot be decoded, and a player
    does not show them), without those placed before that key frame (open-GOP leading pictures).

    Raises:
        VideoDecodeError: the stream shows no frame, has neither pts nor a frame rate, or its first
            picture cannot be decoded.
    """
    packets: list[Packet] = []
    first = None
    stopped = None
    try:
        for packet in container.demux(stream):
            progress()
            if packet.size == 0:
                continue  # the demuxer's end-of-stream flush packet
            packets.append((packet.pts, packet.dts, packet.is_keyframe, packet.is_discard))
            if first is None:
                first = _decode_first(stream, packet)
    except av.FFmpegError as error:
        stopped = f"the container cannot be read past {len(packets)} packets: {ffmpeg_reason(error)}"
    # MP4/MOV's frame count indexes every sample (its sample table): fewer packets means lost data. AVI's
    # header count does not (packed B-frames: 150 listed, 149 packets in a playable file); others give none.
    if stopped is None and "mp4" in container.format.name.split(",") and stream.frames > len(packets):
        stopped = f"the container lists {stream.frames} frames but holds the data of {len(packets)} (truncated file?)"
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    try:
        timeline = build_timeline(packets, container.format.name, fps, float(stream.time_base),
                                  container.start_time)
    except VideoDecodeError as error:
        raise VideoDecodeError(path, stopped if stopped and not shown_packets(packets) else error.reason) from None
    if first is None:
        first = _first_frame_by_flushing(stream, path)
    rotation = quarter_turns(first.rotation) * 90
    width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
    times = timeline.timestamps_s
    step = 1.0 / fps if fps else (float(np.median(np.diff(times))) if len(times) > 1 else 0.0)
    info = VideoInfo(
        path=path,
        num_frames=len(timeline.pts),
        fps=fps,
        duration_s=float(times[-1] + step),
        width=int(width),
        height=int(height),
        rotation=rotation,
        codec=stream.codec_context.name,
        stream_index=stream.index,
        timestamps_s=times,
        time_source=timeline.time_source,
        key_frame_indices=timeline.key_frame_indices,
        unreadable_tail=f"{stopped}; frames after {times[-1]:.3f} s are lost" if stopped else None,
    )
    return info, timeline


def _decode_first(stream: av.video.stream.VideoStream, packet: av.Packet) -> av.VideoFrame | None:
    """The first picture, fed packet by packet; a key frame is decoded alone (the decoder drained at once
    rather than fed the frames its reordering delay holds back). A packet the decoder rejects is skipped
    (a damaged start must not end the demux pass: the frames it hides are reported when they are sampled)."""
    context = stream.codec_context
    try:
        frames = context.decode(packet)
        if not frames and packet.is_keyframe:
            try:
                frames = context.decode(None)
            finally:
                context.flush_buffers()  # out of the drained state, for the next packet or the first seek
    except av.FFmpegError:
        return None
    return frames[0] if frames else None


def _first_frame_by_flushing(stream: av.video.stream.VideoStream, path: str) -> av.VideoFrame:
    """The decoder holds frames back (B-frames, frame threads) until it is flushed."""
    try:
        for frame in stream.codec_context.decode(None):
            return frame
    except av.FFmpegError as error:
        raise VideoDecodeError(path, f"cannot decode the first frame: {ffmpeg_reason(error)}") from error
    raise VideoDecodeError(path, "cannot decode the first frame: the decoder returned no picture")
