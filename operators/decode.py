"""Decoding sampled frames with PyAV on the presented-frame timeline (`operators.timeline`): frame k is
the k-th frame a player shows, at the time it shows it.

One `VideoReader` opens a file once: it picks the video stream, refuses one it cannot decode, and
probes its timeline (`operators.timeline.probe`). `VideoReader.frames` then decodes sampled frames by
seeking to the key frame at or before each target (`operators.seek`) and decoding forward until the
frame with the target's pts (the k-th of equal pts when several frames share one), so a frame's
identity is its pts, never a count of packets. Frames come out upright (the container's display
rotation applied) and scaled in FFmpeg's scaler to the requested size; a frame is never converted to
RGB at source resolution. Frame-order streams are decoded in order from the start.

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
times. `benchmarks/bench_decoders.py` measures both; docs/decoder.md gives the numbers.

Damaged files: a frame that cannot be decoded (or that the stream ends before) is reported as a
`FrameError` and decoding goes on with the next sampled frame from its own key frame, so the frames
before (and after) the damage are kept.

Progress: a reader given a ``progress`` callable calls it for every packet it reads or decodes and every
picture it decodes, so a watcher can tell a slow decode (an hour of a frame-order AVI decoded from the
start) from a hung one.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from operators.errors import VideoDecodeError
from operators.seek import run_ends, run_starts, seek_positions
from operators.timeline import Progress, VideoInfo, ffmpeg_reason, no_progress, probe

DEFAULT_MAX_FRAME_PIXELS = 36_000_000  # 8K (8192x4320 is 35.4 Mpx); a larger frame is refused
INTRA_PICTURES = (av.video.frame.PictureType.I, av.video.frame.PictureType.SI, av.video.frame.PictureType.NONE)


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


class VideoReader:
    """One open video: its probe (`info`) and its frames (`frames`). Use as a context manager.

    Args:
        path: a local file.
        max_pixels: a coded frame larger than this (width x height) is refused before any decoding.
        threads: FFmpeg decoding threads (0: FFmpeg's choice; frame threads decode ahead of a target, so
            more threads cost more CPU per sampled frame for less wall time).
        progress: called for every packet read or decoded and every picture decoded (see the module).

    Raises:
        VideoDecodeError: the file cannot be opened, holds no video stream (or only an attached
            picture such as an audio file's cover), has no decoder for its codec, is too large, has no
            frames, or its first frame cannot be decoded.
    """

    def __init__(self, path: str, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS, threads: int = 1,
                 progress: Progress = no_progress) -> None:
        self.path = path
        self.progress = progress
        try:
            self._container = av.open(path)
        except (av.FFmpegError, OSError, ValueError) as error:
            raise VideoDecodeError(path, f"cannot open the file as a video: {ffmpeg_reason(error)}") from error
        try:
            self._stream = self._video_stream(max_pixels)
            self._stream.thread_type = "AUTO"
            self._stream.codec_context.thread_count = threads
            self.info, timeline = probe(self._container, self._stream, path, progress)
            self._pts = timeline.pts  # [num_frames] int64 pts of each presented frame
            self._keys = timeline.keys  # [k, 2] int64 (pts, dts) of the key frames a seek may go to
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
        if stream.codec_context is None:  # FFmpeg has no decoder for it (unknown FourCC, damaged sample description)
            raise VideoDecodeError(self.path, f"no decoder for the video stream ({self._describe(stream)}): an unknown "
                                              "codec tag, or a damaged codec description")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoDecodeError(
                self.path, f"{width}x{height} frames exceed the frame pixel limit {max_pixels} (--max-frame-pixels)")
        return stream

    def _describe(self, stream: av.video.stream.VideoStream) -> str:
        """How FFmpeg describes ``stream`` (codec name or ``none``, codec tag): ``none (ZQZQ / 0x515A515A), ...``."""
        level = av.logging.get_level()
        av.logging.set_level(av.logging.INFO)  # dumps_format captures FFmpeg's log at INFO
        try:
            dump = self._container.dumps_format()
        finally:
            av.logging.set_level(level)
        found = re.search(rf"Stream #0:{stream.index}\b[^:]*: Video: ([^,\n]*)", dump)
        return f"stream {stream.index}: {found.group(1)[:100]}" if found else f"stream {stream.index}, codec unknown"

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
        wanted = iter(indices.tolist())
        target = next(wanted, None)
        position = -1
        if target is None:
            return
        try:
            self._container.seek(0, stream=self._stream, backward=True)
            for frame in self._container.decode(self._stream):
                self.progress()
                position += 1
                if position == target:
                    yield DecodedFrame(target, float(self.info.timestamps_s[target]), convert(frame))
                    target = next(wanted, None)
                    if target is None:
                        return
            reason = f"the stream ends after {position + 1} of {self.info.num_frames} frames"
        except av.FFmpegError as error:
            reason = f"cannot be decoded: {ffmpeg_reason(error)}"
        for index in ([target] if target is not None else []) + list(wanted):
            yield FrameError(index, reason)

    def _by_pts(self, indices: np.ndarray, convert: _Converter) -> Iterator[DecodedFrame | FrameError]:
        targets = self._pts[indices].tolist()  # [n] pts of every target
        starts = run_starts(targets, self._keys)  # which targets start a run (`operators.seek`)
        ends = run_ends(starts)  # ends[i]: the index past the last target of i's run
        decoder: Iterator[av.VideoFrame] | None = None
        last_pts: int | None = None  # pts of the last frame the decoder returned
        for i, index in enumerate(indices.tolist()):
            target = targets[i]
            rank = index - int(np.searchsorted(self._pts, target, side="left"))  # among frames of equal pts
            must_seek = decoder is None or starts[i] or last_pts is None or last_pts >= target
            attempts = self._seeks(target, targets[i:ends[i]])
            result: DecodedFrame | FrameError | _Missed | None = None
            for position, wanted in attempts if must_seek else itertools.chain([(None, None)], attempts):
                if position is not None:
                    try:
                        self._container.seek(position, stream=self._stream, backward=True)  # flushes the decoder
                    except av.FFmpegError as error:  # damaged index or data where the seek lands: try the next
                        result = _Missed(f"cannot seek to pts {position}: {ffmpeg_reason(error)}")
                        continue
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
        `operators.seek.seek_positions` with ``run`` (this target and those decoded on from it) wanted, then the first
        position again decoding every packet (the last resort). Made when tried: most targets never seek."""
        positions = seek_positions(self._keys, target)
        wanted = np.asarray(run, dtype=np.int64)
        yield from ((position, wanted) for position in positions)
        yield positions[0], None

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
                self.progress()
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

    def _decode_until(self, decoder, target: int, rank: int, index: int, convert: _Converter):
        """Decode forward to the frame ``(target pts, rank)``: (result, decoder, last pts seen)."""
        seen = 0
        last_pts = None
        try:
            for frame in decoder:
                self.progress()
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
            return FrameError(index, f"cannot be decoded: {ffmpeg_reason(error)}"), None, last_pts
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
