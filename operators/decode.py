"""Video decoding with PyAV on the **presented-frame timeline**: the frames a player shows, in the order it
shows them, at the times it shows them.

One `VideoReader` opens a file once. Its probe demuxes every packet of the video stream without
decoding (plus the first frame, for the display rotation and to prove the stream decodes) and builds
the timeline from the packets' presentation timestamps (pts):

* ``frame_index`` k is the k-th presented frame: packets the container's edit list hides (FFmpeg flags
  them *discard*) are not frames; the rest, sorted by pts, are. ``0 <= k < num_frames``.
* ``timestamp_s`` is the frame's pts minus the container's start time (``AVFormatContext.start_time``),
  in seconds: an MPEG-TS whose clock starts at 1.48 s shows its first frame at 0.0; a video track that
  starts 2 s after its audio keeps its 2 s.
* AVI stores no presentation timestamps (FFmpeg guesses them, off by one with B-frames), and a stream
  may lack them: then frame k is the k-th frame decoded in order and its time is ``k / frame rate``
  (``VideoInfo.time_source == "frame_rate"``).

`VideoReader.frames` decodes sampled frames by seeking to the key frame at or before each target and
decoding forward until the frame with the target's pts (the k-th of equal pts when several frames
share one), so a frame's identity is its pts, never a count of packets. Frames come out upright (the
container's display rotation applied) and scaled in FFmpeg's scaler to the requested size; a frame is
never converted to RGB at source resolution. Frame-order streams are decoded in order from the start.

What decoding forward costs is cut three ways, none of which changes a pixel of a target (the tests
compare against decoding every frame in order): packets are sent to the decoder one by one, and a packet
that is not a target's is decoded only when other pictures refer to it (FFmpeg's ``skip_frame`` =
``NONREF`` skips non-reference pictures, typically a third to a half of an H.264 stream with B-frames);
targets between two key frames share one decoding pass; and after the last target before the next seek the
decoder is drained at once instead of being fed the frames its reordering delay would otherwise decode.
One decoding thread by default: the job runs one decoder per reserved CPU, and FFmpeg's frame threads
decode ahead of a target and cost CPU that a seek throws away.

Why not decord (the product card's decoder): decord 0.6 (and its fork decord2) index demuxed packets
rather than presented frames and rebase times to the stream's own start; on real files (edit lists,
MPEG-TS clocks, AVI without pts, delayed tracks, WebM without cues) it returns wrong pictures and
times. `benchmarks/bench_decoders.py` measures both; the README gives the numbers.

Damaged files: a frame that cannot be decoded (or that the stream ends before) is reported as a
`FrameError` and decoding goes on with the next sampled frame from its own key frame, so the frames
before (and after) the damage are kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

DEFAULT_MAX_FRAME_PIXELS = 36_000_000  # 8K (8192x4320 is 35.4 Mpx); a larger frame is refused
FRAME_ORDER_FORMATS = ("avi",)  # containers that store no presentation timestamps
# containers whose seeks land on pictures stamped with another picture's pts (MPEG-PS): decoded from the start
NO_SEEK_FORMATS = ("mpeg",)
SEEK_KEY_FRAMES = 3  # key frames tried (each earlier than the last) before decoding from the stream's start
INTRA_PICTURES = (av.video.frame.PictureType.I, av.video.frame.PictureType.SI, av.video.frame.PictureType.NONE)


class MediaError(Exception):
    """An input that cannot be decoded; ``path`` and ``reason`` say which and why. Permanent: running
    again gives the same answer, so the job records it as an error row."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable across processes with its two arguments
        return type(self), (self.path, self.reason)


class VideoDecodeError(MediaError):
    """A file that is not a decodable video (no video stream, unreadable container, absurd size)."""


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
        }


def _shown(packets: list[tuple]) -> list[tuple]:
    """The packets (pts, dts, key, discard) a player shows: not discarded, from the first key frame in
    decoding order on, and not placed before that key frame. Without any key-frame flag, all that are
    not discarded."""
    first_key = next((i for i, (_, _, key, _) in enumerate(packets) if key), None)
    if first_key is None:
        return [p for p in packets if not p[3]]
    key_pts = packets[first_key][0]
    return [p for p in packets[first_key:]
            if not p[3] and not (key_pts is not None and p[0] is not None and p[0] < key_pts)]


def _quarter_turns(degrees: float | None) -> int:
    """A display rotation as quarter turns counter-clockwise in -1..2 (the nearest; pictures are only
    ever turned by quarter turns)."""
    turns = int(round((degrees or 0.0) / 90.0)) % 4
    return turns - 4 if turns == 3 else turns


def _reason(error: BaseException) -> str:
    """FFmpeg's message without the errno number, or the first line of any other error."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror[:300]
    return _first_line(error)


@dataclass(frozen=True)
class DecodedFrame:
    index: int  # presented frame number
    timestamp_s: float
    pixels: np.ndarray  # [H, W, 3] uint8 RGB, upright, at the requested size


@dataclass(frozen=True)
class FrameError:
    index: int  # presented frame number that could not be decoded
    reason: str


SizeFor = Callable[[int, int], tuple[int, int]]  # upright source (width, height) -> decoded (width, height)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class VideoReader:
    """One open video: its probe (`info`) and its frames (`frames`). Use as a context manager.

    Args:
        path: a local file.
        max_pixels: a coded frame larger than this (width x height) is refused before any decoding.
        threads: FFmpeg decoding threads (0: FFmpeg's choice; frame threads decode ahead of a target, so
            more threads cost more CPU per sampled frame for less wall time).

    Raises:
        VideoDecodeError: the file cannot be opened, holds no video stream (or only an attached
            picture such as an audio file's cover), is too large, has no frames, or its first frame
            cannot be decoded.
    """

    def __init__(self, path: str, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS, threads: int = 1) -> None:
        self.path = path
        try:
            self._container = av.open(path)
        except (av.FFmpegError, OSError, ValueError) as error:
            raise VideoDecodeError(path, f"cannot open the file as a video: {_reason(error)}") from error
        try:
            self._stream = self._video_stream(max_pixels)
            self._stream.thread_type = "AUTO"
            self._stream.codec_context.thread_count = threads
            self.info, self._pts, self._keys = self._probe()
            self._key_flags = bool(len(self._keys))  # whether the stream flags key frames (seeks are to them)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _video_stream(self, max_pixels: int) -> av.video.stream.VideoStream:
        streams = self._container.streams
        moving = [s for s in streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not moving:
            kinds = ", ".join(sorted({s.type for s in streams})) or "no streams"
            if streams.video:
                raise VideoDecodeError(self.path, f"no video stream, only an attached picture (cover art); streams: {kinds}")
            raise VideoDecodeError(self.path, f"no video stream; streams: {kinds}")
        best = streams.best("video")
        stream = best if best in moving else moving[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoDecodeError(
                self.path, f"{width}x{height} frames exceed the frame pixel limit {max_pixels} (--max-frame-pixels)")
        return stream

    def _probe(self) -> tuple[VideoInfo, np.ndarray, np.ndarray]:
        """Demux every packet of the stream (decoding only up to the first picture) → the presented timeline.

        Shown frames: the packets the edit list does not hide (FFmpeg's *discard* flag), from the first
        key frame on (a stream joined mid-GOP starts with pictures that cannot be decoded, and a player
        does not show them), without those placed before that key frame (open-GOP leading pictures).
        """
        stream = self._stream
        packets: list[tuple[int | None, int | None, bool, bool]] = []  # (pts, dts, key, discard), demux order
        first = None
        stopped = None
        try:
            for packet in self._container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                packets.append((packet.pts, packet.dts, packet.is_keyframe, packet.is_discard))
                if first is None:
                    first = self._decode_first(packet)
        except av.FFmpegError as error:
            stopped = f"the container cannot be read past {len(packets)} packets: {_reason(error)}"
        if stopped is None and self._indexes_samples() and stream.frames > len(packets):
            stopped = f"the container lists {stream.frames} frames but holds the data of {len(packets)} (truncated file?)"
        shown = _shown(packets)
        if not shown:
            if stopped:
                raise VideoDecodeError(self.path, stopped)
            raise VideoDecodeError(self.path, "the video stream has no frames")
        if first is None:
            first = self._first_frame_by_flushing()
        rotation = _quarter_turns(first.rotation) * 90
        width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        pts = [p[0] for p in shown]
        dts = [p[1] for p in packets if p[1] is not None]
        # AVI stores no pts; a stream may lack some; a concatenated stream's clock jumps back (dts decrease):
        # in all three the frames' order is their decoding order and their time k / fps.
        frame_order = (self._container.format.name in FRAME_ORDER_FORMATS or any(p is None for p in pts)
                       or any(b < a for a, b in zip(dts, dts[1:])))
        if frame_order:
            if not fps:
                raise VideoDecodeError(self.path, "the stream has neither usable presentation timestamps nor a frame rate")
            timeline = np.arange(len(pts), dtype=np.int64)
            times = timeline / fps
            keys = np.zeros((0, 2), dtype=np.int64)  # never seek: frames are counted from the start
        else:
            timeline = np.sort(np.asarray(pts, dtype=np.int64))
            start = self._container.start_time  # microseconds, the container's own clock origin
            base = float(stream.time_base)
            origin = start / 1e6 if start is not None else timeline[0] * base
            times = timeline * base - origin
            # where to seek for a key frame: demuxers seek by pts (MP4, Matroska) or dts (MPEG-TS); dts <= pts
            keys = np.unique(np.array([(p, d if d is not None else p) for p, d, key, _ in packets
                                       if key and p is not None], dtype=np.int64).reshape(-1, 2), axis=0)
            if self._container.format.name in NO_SEEK_FORMATS:
                keys = keys[:0]  # one pass from the start (the stream's start is the one position sought)
        shown_keys = np.unique(np.searchsorted(timeline, keys[np.isin(keys[:, 0], timeline), 0]))  # the shown key frames
        step = 1.0 / fps if fps else (float(np.median(np.diff(times))) if len(times) > 1 else 0.0)
        info = VideoInfo(
            path=self.path,
            num_frames=len(timeline),
            fps=fps,
            duration_s=float(times[-1] + step),
            width=int(width),
            height=int(height),
            rotation=rotation,
            codec=stream.codec_context.name,
            stream_index=stream.index,
            timestamps_s=times.astype(np.float64),
            time_source="frame_rate" if frame_order else "pts",
            key_frame_indices=shown_keys.astype(np.int64),
            unreadable_tail=f"{stopped}; frames after {times[-1]:.3f} s are lost" if stopped else None,
        )
        return info, timeline, keys

    def _indexes_samples(self) -> bool:
        """Whether the container's frame count is an index of every sample (MP4/MOV: the sample table), so
        fewer packets than it lists means lost data. AVI's header count is not (packed B-frames: 150
        listed, 149 packets in a playable file); Matroska and MPEG-TS give none."""
        return "mp4" in self._container.format.name.split(",")

    def _decode_first(self, packet: av.Packet) -> av.VideoFrame | None:
        """The first picture, fed packet by packet; a key frame is decoded alone (the decoder drained at
        once rather than fed the frames its reordering delay holds back). A packet the decoder rejects is
        skipped (a damaged start must not end the demux pass: the frames it hides are reported when they
        are sampled)."""
        context = self._stream.codec_context
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

    def _first_frame_by_flushing(self) -> av.VideoFrame:
        """The decoder holds frames back (B-frames, frame threads) until it is flushed."""
        try:
            for frame in self._stream.codec_context.decode(None):
                return frame
        except av.FFmpegError as error:
            raise VideoDecodeError(self.path, f"cannot decode the first frame: {_reason(error)}") from error
        raise VideoDecodeError(self.path, "cannot decode the first frame: the decoder returned no picture")

    def frames(self, frame_indices: np.ndarray, size_for: SizeFor | None = None) -> Iterator[DecodedFrame | FrameError]:
        """Decode ``frame_indices`` (increasing presented-frame numbers) one after the other.

        Args:
            frame_indices: ``[n]`` int, each in ``[0, info.num_frames)``.
            size_for: maps the upright source size ``(width, height)`` to the size to decode to
                (FFmpeg's bicubic scaler); None keeps the source size.

        Yields:
            a `DecodedFrame` per index, or a `FrameError` for an index that cannot be decoded (damaged
            data, or the stream ends before it); decoding then goes on with the next index.

        Raises:
            ValueError: an index outside the timeline, or indices not increasing.
        """
        indices = np.asarray(frame_indices, dtype=np.int64)
        if len(indices) and (indices[0] < 0 or indices[-1] >= self.info.num_frames or np.any(np.diff(indices) <= 0)):
            raise ValueError(f"frame indices must increase within [0, {self.info.num_frames}), got {indices.tolist()}")
        convert = _Converter(self.info, size_for)
        if self.info.time_source == "frame_rate":
            yield from self._in_order(indices, convert)
        else:
            yield from self._by_pts(indices, convert)

    def _in_order(self, indices: np.ndarray, convert: _Converter) -> Iterator[DecodedFrame | FrameError]:
        """Frame-order streams: the k-th frame decoded from the start is frame k."""
        self._container.seek(0, stream=self._stream, backward=True)
        wanted = iter(indices.tolist())
        target = next(wanted, None)
        position = -1
        if target is None:
            return
        try:
            for frame in self._container.decode(self._stream):
                position += 1
                if position == target:
                    yield DecodedFrame(target, float(self.info.timestamps_s[target]), convert(frame))
                    target = next(wanted, None)
                    if target is None:
                        return
            reason = f"the stream ends after {position + 1} of {self.info.num_frames} frames"
        except av.FFmpegError as error:
            reason = f"cannot be decoded: {_reason(error)}"
        for index in ([target] if target is not None else []) + list(wanted):
            yield FrameError(index, reason)

    def _by_pts(self, indices: np.ndarray, convert: _Converter) -> Iterator[DecodedFrame | FrameError]:
        targets = self._pts[indices].tolist()  # [n] pts of every target
        # Targets are decoded in runs: one seek, then decoding on to the next target, which is cheaper than a
        # seek unless that target's key frame lies after the one before (or they share a pts).
        starts = [i == 0 or target == targets[i - 1] or self._key_after(targets[i - 1], target)
                  for i, target in enumerate(targets)]
        run_ends = [0] * len(targets)  # run_ends[i]: the index past the last target of i's run
        end = len(targets)
        for i in reversed(range(len(targets))):
            run_ends[i] = end
            if starts[i]:
                end = i
        decoder: Iterator[av.VideoFrame] | None = None
        last_pts: int | None = None  # pts of the last frame the decoder returned
        for i, index in enumerate(indices.tolist()):
            target = targets[i]
            rank = index - int(np.searchsorted(self._pts, target, side="left"))  # among frames of equal pts
            must_seek = decoder is None or starts[i] or last_pts is None or last_pts >= target
            attempts = self._seeks(target, targets[i:run_ends[i]])
            result: DecodedFrame | FrameError | _Missed | None = None
            for position, wanted in attempts if must_seek else itertools.chain([(None, None)], attempts):
                if position is not None:
                    self._container.seek(position, stream=self._stream, backward=True)  # flushes the decoder
                    decoder = self._decoded_frames(wanted)
                result, decoder, last_pts = self._decode_until(decoder, target, rank, index, convert)
                if not isinstance(result, _Missed):
                    break
            if isinstance(result, _Missed):
                result = FrameError(index, f"not found where its timestamp places it: {result.reason}")
            if isinstance(result, FrameError):
                decoder = None
            yield result

    def _seeks(self, target: int, run: list[int]) -> Iterator[tuple[int, np.ndarray | None]]:
        """The ways to reach ``target`` from a seek, in the order tried: (position, wanted pts) for each of
        `_seek_positions` with ``run`` (this target and those decoded on from it) wanted, then the first
        position again decoding every packet (the last resort). Made when tried: most targets never seek."""
        positions = self._seek_positions(self._keys[self._keys[:, 0] <= target])
        wanted = np.asarray(run, dtype=np.int64)
        yield from ((position, wanted) for position in positions)
        yield positions[0], None

    def _key_after(self, previous: int, target: int) -> bool:
        """Whether a key frame lies after pts ``previous`` and at or before pts ``target``."""
        keys = self._keys[:, 0]
        return bool(np.searchsorted(keys, target, side="right") > np.searchsorted(keys, previous, side="right"))

    def _decoded_frames(self, wanted: np.ndarray | None) -> Iterator[av.VideoFrame]:
        """The frames decoded from the container's position, packet by packet.

        Decoding starts at the first key frame after the seek (a seek can land on a packet after the key
        frame it was asked for, whose pictures lack their references), and that key frame must decode to an
        intra picture (else `_NotIntra`).

        ``wanted`` (``[m]`` int pts of the targets to decode from here on): a packet whose pts is not
        wanted is skipped when no other picture refers to it (``skip_frame`` NONREF), and once every wanted
        packet is sent (as many per pts as the timeline has frames with it; with B-frames the last one in
        decoding order is not always the last target) the decoder is drained, so nothing after the
        targets is decoded. None: every packet decoded in full until the stream ends (the plain way, kept as
        a last resort).
        """
        context = self._stream.codec_context
        unsent: dict[int, int] | None = None  # wanted pts -> its packets not sent yet
        if wanted is not None:
            pts = np.unique(wanted)
            counts = np.searchsorted(self._pts, pts, side="right") - np.searchsorted(self._pts, pts, side="left")
            unsent = dict(zip(pts.tolist(), counts.tolist()))
        started = not self._key_flags  # decoding starts at the first key frame after the seek
        check: int | None = None  # that key frame's pts, until the first picture from it on is checked
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream packet: drained below
                if not started:
                    if not packet.is_keyframe:
                        continue  # a seek may land before or after a key frame: decoding starts at one
                    started = True
                    # a key frame the edit list hides is never shown: nothing to check (later frames are)
                    check = None if packet.is_discard else packet.pts
                if unsent is None:
                    context.skip_frame = "DEFAULT"
                elif packet.pts in unsent:
                    context.skip_frame = "DEFAULT"
                    unsent[packet.pts] -= 1
                    if not unsent[packet.pts]:
                        del unsent[packet.pts]
                else:
                    context.skip_frame = "NONREF"
                # A packet the decoder rejects ends the run (FrameError): the pictures it still holds back are
                # not drained, as damage is often reported a packet or two after it begins.
                for frame in context.decode(packet):
                    if check is not None and frame.pts is not None and frame.pts >= check:
                        # the first picture from the key frame on must be the key frame's, and intra: a
                        # recovery point (intra refresh) is a P picture, or the decoder drops it
                        if frame.pict_type not in INTRA_PICTURES:
                            raise _NotIntra(check, av.video.frame.PictureType(frame.pict_type).name)
                        check = None
                    yield frame
                if unsent is not None and not unsent:
                    break
            context.skip_frame = "DEFAULT"
            yield from context.decode(None)
        finally:
            context.skip_frame = "DEFAULT"

    def _seek_positions(self, keys: np.ndarray) -> list[int]:
        """Where to seek for a target whose key frames at or before it are ``keys [k, 2]`` (pts, dts), in the
        order tried: the last key frame by its pts (MP4, Matroska index by it), then by its dts (MPEG-TS
        seeks by dts: a pts lands a key frame late), then earlier key frames, then the stream's start. A
        position that lands after the target is detected (the first frame is later than it) and the next
        one is tried."""
        positions = []
        for pts, dts in keys[::-1][:SEEK_KEY_FRAMES].tolist():
            positions += [pts] if pts == dts else [pts, dts]
        positions.append(int(self._keys[:, 1].min()) if len(self._keys) else 0)
        return list(dict.fromkeys(positions))

    def _decode_until(self, decoder, target: int, rank: int, index: int, convert: _Converter):
        """Decode forward to the frame ``(target pts, rank)``: (result, decoder, last pts seen)."""
        seen = 0
        last_pts = None
        try:
            for frame in decoder:
                if frame.pts is None:
                    continue  # a picture without a time cannot be placed on the timeline
                last_pts = frame.pts
                if frame.pts < target:
                    continue
                if frame.pts > target:
                    return _Missed(f"the decoder went from before it to pts {frame.pts}"), decoder, last_pts
                if seen == rank:
                    if frame.is_corrupt:  # concealed damage, in its own data or in a picture it refers to
                        return FrameError(index, "the decoder marks it damaged"), None, last_pts
                    return DecodedFrame(index, float(self.info.timestamps_s[index]), convert(frame)), decoder, last_pts
                seen += 1
        except av.FFmpegError as error:
            return FrameError(index, f"cannot be decoded: {_reason(error)}"), None, last_pts
        except _NotIntra as not_intra:
            self._keys = self._keys[self._keys[:, 0] != not_intra.pts]  # never seek to it again
            return _Missed(str(not_intra)), None, last_pts
        return _Missed("the stream ends before it (truncated file?)"), None, last_pts


class _NotIntra(Exception):
    """The packet a seek lands on is flagged a key frame, but the first picture decoded from it on is a
    predicted one (an H.264 recovery point of intra refresh, say): decoding from it gives wrong pictures."""

    def __init__(self, pts: int, picture_type: str) -> None:
        super().__init__(f"the key frame at pts {pts} does not start with an intra picture ({picture_type})")
        self.pts = pts


@dataclass(frozen=True)
class _Missed:
    reason: str


class _Converter:
    """A decoded frame → ``[H, W, 3]`` uint8 RGB, scaled by FFmpeg in its coded orientation, then turned upright."""

    def __init__(self, info: VideoInfo, size_for: SizeFor | None) -> None:
        width, height = size_for(info.width, info.height) if size_for else (info.width, info.height)
        self.turns = info.rotation // 90  # np.rot90 turns counter-clockwise, as the display matrix does
        self.coded_size = (height, width) if info.rotation % 180 else (width, height)
        # One scaler for the video: `VideoFrame.reformat` builds a new one for every frame, and setting up a
        # bicubic 1080p -> 336 px scaler costs more than scaling (about 8 ms against 5 ms here).
        self.reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.coded_size
        rgb = self.reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                        interpolation="BICUBIC").to_ndarray()
        return np.ascontiguousarray(np.rot90(rgb, self.turns)) if self.turns else rgb
