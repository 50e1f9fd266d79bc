"""The PyAV reader on real and hostile files: the presented-frame timeline, the right picture for every index,
timestamps on the player's timeline, rotation, scaling in the decoder, sampling, typed errors."""

from __future__ import annotations

import weakref

import av
import numpy as np
import pytest

from operators.decode import DecodedFrame, FrameError, VideoReader
from operators.errors import VideoDecodeError
from operators.seek import run_ends, run_starts, seek_positions
from operators.timeline import build_timeline
from operators.frames import FrameRequest, frame_rows
from operators.preprocess import Preprocessing
from operators.sampling import FrameSampling, nearest_key_frames, sample_frame_indices
from media import DECODABLE, frame_number, hostile, pyav_frames, video, write_clip, write_numbered_clip

# The hostile clips' truth (tests/data/hostile-videos/README.md): presented frames, the number drawn in
# the first presented picture, the first presented frame's time on the player's timeline, frames per second.
HOSTILE = {
    "ts_start_offset.ts": (250, 0, 0.0, 25),  # the stream's clock starts at 1.48 s: shown at 0
    "editlist_cut.mp4": (102, 35, 0.0, 25),  # 137 packets; the edit list hides 35; the first shown is N=35
    "delayed_video.mp4": (100, 0, 2.0, 25),  # the video track starts 2 s after the audio: the gap is kept
    "avi_xvid_bframes.avi": (149, 0, 0.0, 25),  # no pts: frame k at k/25 s
    "webm_live_nocues.webm": (150, 0, 0.0, 25),  # no duration, no cues
    "vfr.mp4": (130, 0, 0.0, None),  # 30 fps, then 5, then 30; frames 72 and 73 share one pts
    "one_frame.mp4": (1, 0, 0.0, 25),
    "yuv444_odd.mp4": (75, 0, 0.0, 25),
    "mjpeg_422.avi": (60, 0, 0.0, 15),
    "huge_8k.mp4": (4, 0, 0.0, 4),
}


def presented(path: str) -> tuple[list[int], list[float | None]]:
    """The reference: every frame PyAV shows decoding the whole stream in order (edit lists applied):
    its drawn number and its pts time minus the container's start time (None without pts)."""
    with av.open(path) as container:
        start = (container.start_time or 0) / 1e6
        numbers, times = [], []
        for frame in container.decode(video=0):
            small = frame.reformat(width=64, height=48, format="rgb24").to_ndarray()
            numbers.append(frame_number(small))
            times.append(None if frame.pts is None else float(frame.pts * frame.time_base) - start)
    return numbers, times


def decoded(reader: VideoReader, indices, size=None) -> list[DecodedFrame]:
    out = list(reader.frames(np.asarray(indices), size))
    errors = [f for f in out if isinstance(f, FrameError)]
    assert not errors, errors
    return out


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_clip_every_index_is_the_presented_frame_with_its_time(name):
    frames, first_number, first_time, fps = HOSTILE[name]
    numbers, times = presented(hostile(name))
    assert len(numbers) == frames and numbers[0] == first_number
    small = (lambda w, h: (64, 48))
    with VideoReader(hostile(name)) as reader:
        info = reader.info
        assert info.num_frames == frames and info.unreadable_tail is None, "playable: nothing lost"
        assert info.timestamps_s[0] == pytest.approx(first_time, abs=1e-9)
        if name.endswith(".avi"):
            assert info.time_source == "frame_rate"
            np.testing.assert_allclose(info.timestamps_s, np.arange(frames) / fps)
        else:
            assert info.time_source == "pts"
            np.testing.assert_allclose(info.timestamps_s, times, atol=1e-9)
        # every frame, every 7th, and a sparse backwards-built pattern: each decoded on its own terms
        for indices in (np.arange(frames), np.arange(0, frames, 7), np.arange(frames - 1, -1, -23)[::-1]):
            out = decoded(reader, indices, small)
            assert [f.index for f in out] == indices.tolist()
            assert [frame_number(f.pixels) for f in out] == [numbers[i] for i in indices]
            np.testing.assert_allclose([f.timestamp_s for f in out], info.timestamps_s[indices])


def test_hostile_timelines_match_the_players():
    with VideoReader(hostile("ts_start_offset.ts")) as reader:
        assert reader.info.timestamps_s[-1] == pytest.approx(11.44 - 1.48)
    with VideoReader(hostile("editlist_cut.mp4")) as reader:
        assert reader.info.timestamps_s[-1] == pytest.approx(4.08) and reader.info.duration_s == pytest.approx(4.12)
    with VideoReader(hostile("delayed_video.mp4")) as reader:
        assert (reader.info.timestamps_s[0], reader.info.timestamps_s[-1]) == pytest.approx((2.0, 5.96))
    with VideoReader(hostile("vfr.mp4")) as reader:
        times = reader.info.timestamps_s
        assert times[72] == times[73]  # two frames, one pts: both kept, in order
        assert reader.info.time_source == "pts"


def test_frames_sharing_a_pts_are_told_apart():
    numbers, _ = presented(hostile("vfr.mp4"))
    with VideoReader(hostile("vfr.mp4")) as reader:
        for indices in ([72], [73], [72, 73], [10, 73]):
            assert [frame_number(f.pixels) for f in decoded(reader, indices)] == [numbers[i] for i in indices]


@pytest.mark.parametrize("name, reason", [
    ("audio_only.mp4", "no video stream; streams: audio"),
    ("audio_with_cover.mp4", "no video stream, only an attached picture (cover art)"),
])
def test_files_without_a_video_stream_say_so(name, reason):
    with pytest.raises(VideoDecodeError) as caught:
        VideoReader(hostile(name))
    assert reason in caught.value.reason and caught.value.path == hostile(name)


def test_frames_larger_than_the_limit_are_refused_before_decoding():
    with pytest.raises(VideoDecodeError, match=r"7680x4320 frames exceed the frame pixel limit 10000000"):
        VideoReader(hostile("huge_8k.mp4"), max_pixels=10_000_000)
    with VideoReader(hostile("huge_8k.mp4")) as reader:  # within the default limit: scaled in the decoder
        out = decoded(reader, [0, 3], lambda w, h: (w // 20, h // 20))
    assert [f.pixels.shape for f in out] == [(216, 384, 3)] * 2 and [frame_number(f.pixels) for f in out] == [0, 3]


@pytest.mark.parametrize("name", DECODABLE)
def test_every_decodable_file_matches_decoding_in_order(name):
    """Upright (rotation applied), presentation order, full range, 10-bit, HEVC and AV1: the seeking reader
    returns the pixels of decoding the whole stream in order."""
    with VideoReader(video(name)) as reader:
        info = reader.info
        assert info.num_frames > 0 and info.fps > 0
        assert np.all(np.diff(info.timestamps_s) > 0) and info.duration_s > info.timestamps_s[-1]
        indices = np.unique(np.linspace(0, info.num_frames - 1, 6).astype(int))
        out = decoded(reader, indices)
    reference = pyav_frames(video(name))
    assert len(reference) == info.num_frames
    for frame, index in zip(out, indices):
        expected = np.rot90(reference[index], info.rotation // 90)
        assert frame.pixels.shape == expected.shape == (info.height, info.width, 3)
        # 8-bit sources convert bit-identically; 10-bit ones differ by the scaler's chroma filter and rounding.
        assert np.abs(frame.pixels.astype(float) - expected).mean() < (4.0 if "10bits" in name else 0.5)


def test_rotation_metadata_is_read_and_applied():
    expected = {"video_0.mov": 0, "video_90.mov": -90, "video_180.mov": 180, "video_270.mov": 90}
    for name, rotation in expected.items():
        with VideoReader(video(name)) as reader:
            assert reader.info.rotation == rotation
            # the coded stream is 568x320 in all four; quarter turns come out portrait
            assert (reader.info.width, reader.info.height) == ((320, 568) if rotation % 180 else (568, 320))


def test_multi_stream_file_records_the_decoded_stream():
    with VideoReader(video("nasa_13013.mp4")) as reader:
        info = reader.info
    assert (info.width, info.height, info.stream_index, info.codec) == (480, 270, 3, "h264")
    assert info.fps == pytest.approx(30000 / 1001)
    assert info.summary()["stream_index"] == 3


def test_out_of_order_timestamps_come_out_in_presentation_order():
    with VideoReader(video("unordered.mov")) as reader:
        np.testing.assert_allclose(reader.info.timestamps_s, [0.0, 0.03125, 0.0625, 0.09375])


def test_uniform_and_fps_sampling_on_exact_timestamps(tmp_path):
    clip = str(write_clip(tmp_path / "clip.mp4", num_frames=50, fps=10))
    with VideoReader(clip) as reader:
        info = reader.info
        assert info.num_frames == 50 and info.duration_s == pytest.approx(5.0)

        assert sample_frame_indices(info, FrameSampling(num_frames=5)).tolist() == [0, 12, 24, 36, 49]
        assert sample_frame_indices(info, FrameSampling(num_frames=500)).tolist() == list(range(50))
        every_second = sample_frame_indices(info, FrameSampling(num_frames=None, fps=1.0))
        assert every_second.tolist() == [0, 10, 20, 30, 40]
        capped = sample_frame_indices(info, FrameSampling(num_frames=None, fps=1.0, max_frames=3))
        assert capped.tolist() == [0, 20, 40]
        faster_than_video = sample_frame_indices(info, FrameSampling(num_frames=None, fps=25.0))
        assert faster_than_video.tolist() == list(range(50)), "no frame twice"

        out = decoded(reader, every_second)
    np.testing.assert_allclose([f.timestamp_s for f in out], [0.0, 1.0, 2.0, 3.0, 4.0])
    levels = [f.pixels.mean() for f in out]
    np.testing.assert_allclose(levels, [(i * 37) % 256 for i in every_second], atol=3)


def test_fps_sampling_takes_the_frame_at_an_exact_boundary(tmp_path):
    """--fps 3 on a 30 fps clip: frames 0, 10, 20, ... exactly (not the frame before a boundary)."""
    clip = str(write_clip(tmp_path / "clip30.mp4", num_frames=300, fps=30, size=(32, 32)))
    with VideoReader(clip) as reader:
        indices = sample_frame_indices(reader.info, FrameSampling(num_frames=None, fps=3.0))
    assert indices.tolist() == list(range(0, 300, 10))


def test_fps_sampling_starts_at_the_first_frame_not_at_zero():
    with VideoReader(hostile("delayed_video.mp4")) as reader:  # frames from 2.0 s to 5.96 s
        indices = sample_frame_indices(reader.info, FrameSampling(num_frames=None, fps=1.0))
        np.testing.assert_allclose(reader.info.timestamps_s[indices], [2.0, 3.0, 4.0, 5.0])


def test_sampling_policy_is_validated():
    with pytest.raises(ValueError):
        FrameSampling(num_frames=8, fps=1.0)
    with pytest.raises(ValueError):
        FrameSampling(num_frames=None)
    with pytest.raises(ValueError):
        FrameSampling(num_frames=0)
    with pytest.raises(ValueError, match="key_frame_tolerance_s must be >= 0"):
        FrameSampling(key_frames=True, key_frame_tolerance_s=-1.0)
    with pytest.raises(ValueError, match="only used with key_frames"):
        FrameSampling(key_frame_tolerance_s=1.0)


class _Timeline:
    """100 frames at 1 fps, key frames every 10 (or as given)."""

    def __init__(self, keys=range(0, 100, 10)) -> None:
        self.num_frames = 100
        self.duration_s = 100.0
        self.timestamps_s = np.arange(100, dtype=np.float64)
        self.key_frame_indices = np.asarray(list(keys), dtype=np.int64)


def test_key_frame_sampling_takes_the_nearest_key_frame_between_the_neighbours():
    timeline = _Timeline()
    uniform = sample_frame_indices(timeline, FrameSampling(num_frames=5))
    assert uniform.tolist() == [0, 24, 49, 74, 99]
    # 24 -> 20 (4 s) not 30 (6 s); 99 -> 90: the nearest after the frame taken before (70)
    assert sample_frame_indices(timeline, FrameSampling(num_frames=5, key_frames=True)).tolist() == [0, 20, 50, 70, 90]
    within_3s = FrameSampling(num_frames=5, key_frames=True, key_frame_tolerance_s=3.0)
    assert sample_frame_indices(timeline, within_3s).tolist() == [0, 24, 50, 74, 99]
    # a key frame halfway between two sampled frames is neither's: taken, it would sit next to the other
    assert nearest_key_frames(_Timeline([12]), np.array([10, 14])).tolist() == [10, 14]
    assert nearest_key_frames(_Timeline([11]), np.array([10, 14])).tolist() == [11, 14]
    assert nearest_key_frames(_Timeline([13]), np.array([10, 14])).tolist() == [10, 13]
    # nearer to the next sampled frame than to its own: left to that one (no bunching, order kept)
    assert nearest_key_frames(_Timeline([30]), np.array([10, 20, 25])).tolist() == [10, 20, 30]
    # the last sampled frame may take a key frame far before it, if nearer to it than to the frame taken before
    assert nearest_key_frames(_Timeline([0, 40, 55]), np.array([0, 41, 60])).tolist() == [0, 40, 55]
    assert nearest_key_frames(_Timeline([0, 50, 55]), np.array([0, 51, 60])).tolist() == [0, 50, 60]
    every_second = sample_frame_indices(timeline, FrameSampling(num_frames=None, fps=1.0, key_frames=True))
    assert every_second.tolist() == list(range(100)), "every frame sampled: nothing to swap"
    assert nearest_key_frames(_Timeline([]), uniform).tolist() == uniform.tolist(), "frame-order streams: unchanged"


def test_key_frame_mode_rows_record_the_frame_taken(tmp_path):
    """The key frames the probe finds are the encoder's; each row is the key frame it says it is (its drawn
    number, its own timestamp), and a sampled frame without a key frame near it is decoded exactly."""
    path = write_numbered_clip(tmp_path / "keys.mp4", 100, fps=25, options={"g": "25", "keyint_min": "25",
                                                                             "sc_threshold": "0"})
    with av.open(str(path)) as container:
        encoder_keys = [i for i, frame in enumerate(container.decode(video=0)) if frame.key_frame]
    assert encoder_keys == [0, 25, 50, 75]
    with VideoReader(str(path)) as reader:
        assert reader.info.key_frame_indices.tolist() == encoder_keys
        times = reader.info.timestamps_s
    sampling = FrameSampling(num_frames=5, key_frames=True, key_frame_tolerance_s=0.5)  # 0, 24, 49, 74, 99
    request = FrameRequest(path=str(path), sampling=sampling, preprocessing=Preprocessing(image_size=64))
    rows = [row for row in frame_rows(request) if row["kind"] == "frame"]
    assert [row["frame_index"] for row in rows] == [0, 25, 50, 75, 99]  # 99: 1 s from 75, beyond the tolerance
    assert [row["timestamp_s"] for row in rows] == [times[i] for i in (0, 25, 50, 75, 99)]
    assert [frame_number(row["pixels"][0]) for row in rows] == [0, 25, 50, 75, 99]


def test_long_video_streams_one_frame_at_a_time(tmp_path):
    """A 1-hour clip (1 fps, tiny frames): frames come one by one; none is kept after it is consumed."""
    clip = str(write_clip(tmp_path / "hour.mp4", num_frames=3600, fps=1, size=(32, 32)))
    with VideoReader(clip) as reader:
        assert reader.info.duration_s == pytest.approx(3600.0)
        indices = sample_frame_indices(reader.info, FrameSampling(num_frames=None, fps=0.25))
        assert len(indices) == 900
        frames = reader.frames(indices)
        first = next(frames)
        first_pixels = weakref.ref(first.pixels)
        timestamps = [first.timestamp_s]
        del first
        for frame in frames:
            assert first_pixels() is None, "a consumed frame must not be held by the reader"
            timestamps.append(frame.timestamp_s)
    np.testing.assert_allclose(timestamps, indices.astype(float))


def test_resize_on_decode_gives_upright_frames_at_the_requested_size():
    with VideoReader(video("video_90.mov")) as reader:
        full = decoded(reader, [0])[0].pixels  # 568 x 320 (h x w)
        small = decoded(reader, [0], lambda w, h: (160, 284))[0].pixels
    assert small.shape == (284, 160, 3)
    # the same upright picture: compare on a coarse grid, which the scaler's filter cannot move much
    coarse = lambda image, h, w: image[: h * (image.shape[0] // h), : w * (image.shape[1] // w)].reshape(
        h, image.shape[0] // h, w, image.shape[1] // w, 3).mean(axis=(1, 3))
    assert np.abs(coarse(full, 4, 4) - coarse(small, 4, 4)).mean() < 4


def test_unopenable_files_raise_one_typed_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    for path in [str(empty), str(text), str(tmp_path / "missing.mp4")]:
        with pytest.raises(VideoDecodeError) as caught:
            VideoReader(path)
        assert caught.value.path == path and path in str(caught.value) and caught.value.reason


def test_a_stream_without_a_decoder_is_a_media_error_naming_its_codec(tmp_path):
    """PyAV gives no codec context for a stream FFmpeg cannot decode (an unknown FourCC, a damaged sample
    description): that is the file's fault, said with the tag FFmpeg read, never an AttributeError."""
    data = open(hostile("avi_xvid_bframes.avi"), "rb").read()
    patched = tmp_path / "unknown_fourcc.avi"
    patched.write_bytes(data.replace(b"XVID", b"ZQZQ"))
    with pytest.raises(VideoDecodeError, match=r"no decoder for the video stream \(stream 0: none \(ZQZQ / 0x515A515A\)"):
        VideoReader(str(patched))
    moov = bytearray(open(hostile("one_frame.mp4"), "rb").read())
    at = moov.index(b"stsd") + 16  # the type of the sample description's first entry: avc1
    assert moov[at:at + 4] == b"avc1"
    moov[at:at + 4] = b"\0\0\0\0"  # the stream's codec becomes unknown
    damaged = tmp_path / "damaged_stsd.mp4"
    damaged.write_bytes(bytes(moov))
    with pytest.raises(VideoDecodeError, match="no decoder for the video stream"):
        VideoReader(str(damaged))


def test_a_seek_the_container_refuses_is_a_frame_error(tmp_path):
    """One byte of the sample table changed (found by the mutation fuzz): FFmpeg refuses every seek with
    EPERM. Each sampled frame is a frame error naming that, never an exception out of the reader."""
    data = bytearray(open(video("h265_10bits.mp4"), "rb").read())
    data[38022] = 135
    damaged = tmp_path / "seek_refused.mp4"
    damaged.write_bytes(bytes(data))
    with VideoReader(str(damaged)) as reader:
        out = list(reader.frames(np.array([0, 9, 19, 29])))
    assert [type(f).__name__ for f in out] == ["FrameError"] * 4
    assert all("cannot seek to pts" in f.reason and "Operation not permitted" in f.reason for f in out)


def test_the_timeline_rules_without_ffmpeg():
    """`build_timeline` on packet lists: discarded packets and leading pictures before the first key frame
    are not frames; frames sort by pts; times start at the container's start; a stream without pts or whose
    dts jump back is in decoding order at k / fps; MPEG-PS is never sought."""
    packets = [(-2, -3, False, False), (0, -2, True, True), (6, -1, False, False), (2, 0, False, False),
               (4, 1, False, False), (12, 2, True, False), (8, 3, False, False), (10, 4, False, False)]
    timeline = build_timeline(packets, "mov,mp4,m4a,3gp,3g2,mj2", 25.0, 1 / 50, 40_000)
    assert timeline.pts.tolist() == [2, 4, 6, 8, 10, 12] and timeline.time_source == "pts"
    np.testing.assert_allclose(timeline.timestamps_s, [0.0, 0.04, 0.08, 0.12, 0.16, 0.2])
    assert timeline.keys.tolist() == [[0, -2], [12, 2]] and timeline.key_frame_indices.tolist() == [5]
    assert len(build_timeline(packets, "mpeg", 25.0, 1 / 50, None).keys) == 0
    unstamped = [(None, None, True, False), (None, None, False, False), (None, None, False, False)]
    order = build_timeline(unstamped, "avi", 10.0, 1.0, None)
    assert order.time_source == "frame_rate" and order.timestamps_s.tolist() == [0.0, 0.1, 0.2]
    assert build_timeline([(5, 5, True, False), (6, 2, False, False)], "mpegts", 2.0, 1.0, None).time_source == \
        "frame_rate", "a clock that jumps back"
    with pytest.raises(VideoDecodeError, match="no frames"):
        build_timeline([(0, 0, True, True)], "matroska,webm", 25.0, 0.001, None)
    with pytest.raises(VideoDecodeError, match="neither usable presentation timestamps nor a frame rate"):
        build_timeline(unstamped, "avi", 0.0, 1.0, None)


def test_seek_planning_without_ffmpeg():
    """Targets between two key frames are one run; a key frame between two targets, or a repeated pts,
    starts a new run; seeks go to the key frame at or before a target (by pts, then dts), earlier ones,
    then the stream's start."""
    keys = np.array([[0, -2], [10, 8], [20, 20]], dtype=np.int64)
    targets = [1, 5, 12, 12, 25]
    starts = run_starts(targets, keys)
    assert starts == [True, False, True, True, True]
    assert run_ends(starts) == [2, 2, 3, 4, 5]
    assert seek_positions(keys, 12) == [10, 8, 0, -2]
    assert seek_positions(keys, 25) == [20, 10, 8, 0, -2]
    assert seek_positions(np.zeros((0, 2), dtype=np.int64), 3) == [0]


def test_damaged_file_keeps_the_frames_before_the_damage():
    """corrupted.mp4 declares 50 frames; the decoder rejects the packet of frame 30, and the damage begins
    earlier: frame 32, decoded before that packet (it is a P picture the B pictures 29-31 refer to), comes
    out concealed, 8-15 grey levels from every neighbour, and flagged corrupt. A frame the decoder flags is
    an error, and so is every target of a run that meets a rejected packet."""
    path = video("corrupted.mp4")
    with VideoReader(path) as reader:
        assert reader.info.num_frames == 50
        out = list(reader.frames(sample_frame_indices(reader.info, FrameSampling(num_frames=8))))
        held_before_the_damage = list(reader.frames(np.array([32])))
    assert [f.index for f in out] == [0, 7, 14, 21, 28, 35, 42, 49]
    assert [type(f).__name__ for f in out] == ["DecodedFrame"] * 4 + ["FrameError"] * 4
    assert all("cannot be decoded" in f.reason for f in out[4:])
    assert isinstance(held_before_the_damage[0], FrameError)
    assert held_before_the_damage[0].reason == "the decoder marks it damaged"
    with av.open(path) as container:  # decoding in order, going on past the rejected packets
        in_order = {}
        for packet in container.demux(video=0):
            try:
                in_order.update((frame.pts, frame.to_ndarray(format="rgb24")) for frame in packet.decode())
            except av.FFmpegError:
                continue
    reference = [in_order[pts] for pts in sorted(in_order)]
    for frame in out[:4]:
        np.testing.assert_array_equal(frame.pixels, reference[frame.index])


def test_truncated_files_keep_what_they_hold(tmp_path):
    """A file cut in half: the frames it still holds decode; the rest are frame errors, never a hang or crash."""
    for name in ("flipping_a_pancake.mkv", "nasa_13013.mp4"):
        data = open(video(name), "rb").read()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 2])
        try:
            reader = VideoReader(str(cut))
        except VideoDecodeError as error:  # an MP4 whose index is at the end cannot be opened at all
            assert error.path == str(cut) and name.endswith(".mp4")
            continue
        with reader:
            out = list(reader.frames(np.arange(reader.info.num_frames)))
        good = [f for f in out if isinstance(f, DecodedFrame)]
        assert len(out) == reader.info.num_frames and len(good) > 0
        assert [f.index for f in good] == list(range(len(good))), "the good frames are the ones before the cut"


def test_indices_outside_the_timeline_are_refused():
    with VideoReader(hostile("editlist_cut.mp4")) as reader:
        with pytest.raises(ValueError, match=r"within \[0, 102\)"):
            list(reader.frames(np.array([0, 102])))


def numbers(path, indices=None) -> list:
    """(index, drawn number, timestamp) of each frame the reader returns; FrameError reasons as they are."""
    with VideoReader(str(path)) as reader:
        wanted = np.arange(reader.info.num_frames) if indices is None else np.asarray(indices)
        return [(f.index, frame_number(f.pixels), f.timestamp_s) if isinstance(f, DecodedFrame) else (f.index, f.reason)
                for f in reader.frames(wanted)]


def test_a_stream_joined_mid_gop_starts_at_its_first_key_frame(tmp_path):
    """An MPEG-TS cut inside a GOP (an HLS segment, a `dd` of a recording): the pictures before the first
    key frame, and the open-GOP pictures placed before it, cannot be decoded and a player does not show
    them; index 0 is the first picture shown."""
    whole = write_numbered_clip(tmp_path / "whole.ts", 200, container_format="mpegts", options={"g": "50"})
    data = whole.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: 188 * 4] + data[int(len(data) / 188 * 0.1) * 188:])  # tables, then 10 % in
    shown, _ = presented(str(cut))
    got = numbers(cut)
    assert len(got) == len(shown) and shown[0] > 0
    assert [n for _, n, _ in got] == shown


def test_a_concatenated_stream_whose_clock_jumps_back_is_taken_in_decoding_order(tmp_path):
    first = write_numbered_clip(tmp_path / "a.ts", 60, container_format="mpegts")
    second = write_numbered_clip(tmp_path / "b.ts", 60, container_format="mpegts", first_number=1000)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with VideoReader(str(joined)) as reader:
        assert reader.info.time_source == "frame_rate" and reader.info.num_frames == 120
        np.testing.assert_allclose(reader.info.timestamps_s, np.arange(120) / 25)
    got = numbers(joined, [0, 59, 60, 119])
    assert [n for _, n, _ in got] == [0, 59, 1000, 1059]


def test_damaged_packets_are_frame_errors_and_the_rest_of_the_video_is_kept(tmp_path):
    """One H.264 packet near the start garbled: the frames that depend on it cannot be decoded (error
    rows), every later frame keeps its own index and picture; the timeline is not cut short."""
    clip = write_numbered_clip(tmp_path / "clip.mp4", 200, options={"g": "50"}, container_options={"movflags": "faststart"})
    with av.open(str(clip)) as container:
        position, size = [(p.pos, p.size) for p in container.demux(video=0) if p.size][1]
    data = bytearray(clip.read_bytes())
    for offset in range(position + 4, position + size):
        data[offset] = (data[offset] * 7 + 13) & 255
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    got = numbers(damaged)
    assert len(got) == 200
    decoded = [(i, n) for i, n, *_ in got if isinstance(n, int)]
    assert len(decoded) >= 150 and all(i == n for i, n in decoded)
    assert all("cannot be decoded" in reason for _, reason in (g for g in got if isinstance(g[1], str)))


def test_a_truncated_mp4_names_the_frames_it_lost(tmp_path):
    clip = write_numbered_clip(tmp_path / "clip.mp4", 200, container_options={"movflags": "faststart"})
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    with VideoReader(str(cut)) as reader:
        info = reader.info
        assert 0 < info.num_frames < 200
        assert info.unreadable_tail.startswith("the container lists 200 frames but holds the data of ")
    good = [g for g in numbers(cut) if isinstance(g[1], int)]
    assert good and [i for i, *_ in good] == [n for _, n, _ in good]


def test_a_rotation_that_is_not_a_quarter_turn_is_not_applied(tmp_path):
    clip = write_numbered_clip(tmp_path / "tilted.mp4", 5, rotation=45)
    with VideoReader(str(clip)) as reader:
        assert (reader.info.rotation, reader.info.width, reader.info.height) == (0, 320, 240)
    assert [n for _, n, _ in numbers(clip)] == list(range(5))


def _moving_pictures(count: int, width: int = 192, height: int = 112):
    """Detailed, moving pictures: each frame's pixels depend on the frames it is predicted from."""
    rng = np.random.default_rng(7)
    texture = rng.integers(0, 256, (height, 2 * width, 3), dtype=np.uint8)
    for index in range(count):
        picture = np.ascontiguousarray(np.roll(texture, 3 * index, axis=1)[:, :width])
        picture[: height // 3, : width // 3] = (index * 11) % 256
        yield picture


@pytest.mark.parametrize("codec, options, suffix", [
    ("libx264", {"preset": "medium", "bf": "3", "b-pyramid": "normal", "g": "24", "keyint_min": "24", "sc_threshold": "0"},
     "mkv"),
    # no IDR after the first: recovery points flagged as key frames, which cannot be decoded alone
    ("libx264", {"x264-params": "intra-refresh=1:keyint=24:bframes=0"}, "mp4"),
    ("libx265", {"x265-params": "keyint=24:min-keyint=24:bframes=4:b-pyramid=1:log-level=error"}, "mkv"),
    ("libvpx-vp9", {"g": "24", "auto-alt-ref": "1", "lag-in-frames": "16"}, "webm"),
    ("mpeg2video", {"g": "12", "bf": "2"}, "mkv"),
    ("mpeg2video", {"g": "12", "bf": "2"}, "mpg"),  # MPEG-PS: a seek lands on a picture stamped with another's pts
])
@pytest.mark.parametrize("threads", [1, 0])
def test_skipping_and_draining_change_no_pixel(tmp_path, codec, options, suffix, threads):
    """Frames nothing refers to are skipped and the decoder is drained after the last target: every target's
    pixels stay exactly those of decoding the whole stream in order, with one thread or FFmpeg's frame threads."""
    path = tmp_path / f"clip.{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 192, 112, "yuv420p"
        stream.options = options
        for picture in _moving_pictures(96):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        reference = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(reference) == 96
    with VideoReader(str(path), threads=threads) as reader:
        assert reader.info.num_frames == 96
        for indices in ([5, 6, 7, 30, 95], list(range(1, 96, 5)), [23, 24, 25], list(range(96))):
            for frame in decoded(reader, indices):
                np.testing.assert_array_equal(frame.pixels, reference[frame.index], err_msg=f"frame {frame.index}")
