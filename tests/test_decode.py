"""decord decoding on the real test videos and on synthetic clips: probe, sampling, segments, errors."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from operators.decode import VideoDecodeError, decode_segments, probe_video
from operators.sampling import FrameSampling, sample_frame_indices
from media import DECODABLE, pyav_frames, video, write_clip


@pytest.mark.parametrize("name", DECODABLE)
def test_every_decodable_file_matches_an_independent_decoder(name):
    """Upright (rotation applied), presentation order, full range, 10-bit and HEVC all agree with PyAV."""
    info = probe_video(video(name))
    assert info.num_frames > 0 and info.fps > 0
    assert np.all(np.diff(info.timestamps_s) > 0) and info.duration_s > info.timestamps_s[-1]

    indices = np.arange(min(info.num_frames, 6))
    segment = next(decode_segments(video(name), indices))
    assert segment.frames.shape == (len(indices), info.height, info.width, 3)
    np.testing.assert_array_equal(segment.timestamps_s, info.timestamps_s[indices])

    reference = [np.rot90(frame, info.rotation // 90) for frame in pyav_frames(video(name))[: len(indices)]]
    for decoded, expected in zip(segment.frames, reference):
        assert decoded.shape == expected.shape
        # 8-bit sources decode bit-identically; 10-bit ones differ by the RGB conversion's rounding.
        assert np.abs(decoded.astype(float) - expected).mean() < (4.0 if "10bits" in name else 0.5)


def test_rotation_metadata_is_read_and_applied():
    expected = {"video_0.mov": 0, "video_90.mov": -90, "video_180.mov": -180, "video_270.mov": 90}
    for name, rotation in expected.items():
        info = probe_video(video(name))
        assert info.rotation == rotation
        # the coded stream is 568x320 in all four; quarter turns come out portrait
        assert (info.width, info.height) == ((320, 568) if rotation % 180 else (568, 320))


def test_multi_stream_file_records_the_decoded_stream():
    info = probe_video(video("nasa_13013.mp4"))
    assert (info.width, info.height, info.stream_index, info.codec) == (480, 270, 3, "h264")
    assert info.fps == pytest.approx(30000 / 1001)


def test_out_of_order_timestamps_come_out_in_presentation_order():
    info = probe_video(video("unordered.mov"))
    np.testing.assert_allclose(info.timestamps_s, [0.0, 0.03125, 0.0625, 0.09375])


def test_uniform_and_fps_sampling_on_exact_timestamps(tmp_path):
    clip = str(write_clip(tmp_path / "clip.mp4", num_frames=50, fps=10))
    info = probe_video(clip)
    assert info.num_frames == 50 and info.duration_s == pytest.approx(5.0)

    uniform = sample_frame_indices(info, FrameSampling(num_frames=5))
    assert uniform.tolist() == [0, 12, 24, 36, 49]
    assert sample_frame_indices(info, FrameSampling(num_frames=500)).tolist() == list(range(50))

    every_second = sample_frame_indices(info, FrameSampling(num_frames=None, fps=1.0))
    assert every_second.tolist() == [0, 10, 20, 30, 40]
    capped = sample_frame_indices(info, FrameSampling(num_frames=None, fps=1.0, max_frames=3))
    assert capped.tolist() == [0, 20, 40]
    faster_than_video = sample_frame_indices(info, FrameSampling(num_frames=None, fps=25.0))
    assert faster_than_video.tolist() == list(range(50)), "no frame twice"

    segment = next(decode_segments(clip, every_second))
    np.testing.assert_allclose(segment.timestamps_s, [0.0, 1.0, 2.0, 3.0, 4.0])
    levels = segment.frames.reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [(i * 37) % 256 for i in every_second], atol=3)


def test_sampling_policy_is_validated():
    with pytest.raises(ValueError):
        FrameSampling(num_frames=8, fps=1.0)
    with pytest.raises(ValueError):
        FrameSampling(num_frames=None)
    with pytest.raises(ValueError):
        FrameSampling(num_frames=0)


def test_long_video_is_decoded_one_bounded_segment_at_a_time(tmp_path):
    """A 1-hour clip (1 fps, tiny frames): segments of at most 16 frames, none kept after it is consumed."""
    clip = str(write_clip(tmp_path / "hour.mp4", num_frames=3600, fps=1, size=(32, 32)))
    info = probe_video(clip)
    assert info.duration_s == pytest.approx(3600.0)
    indices = sample_frame_indices(info, FrameSampling(num_frames=None, fps=0.25))
    assert len(indices) == 900

    segments = decode_segments(clip, indices, segment_frames=16)
    first = next(segments)
    first_frames = weakref.ref(first.frames)
    sizes, timestamps = [len(first.frame_indices)], [first.timestamps_s]
    del first
    for segment in segments:
        gc.collect()
        assert first_frames() is None, "a consumed segment must not be held by the decoder"
        sizes.append(len(segment.frame_indices))
        timestamps.append(segment.timestamps_s)
    assert max(sizes) == 16 and sum(sizes) == 900
    np.testing.assert_allclose(np.concatenate(timestamps), indices.astype(float))


def test_resize_on_decode_gives_upright_frames_at_the_requested_size():
    full = next(decode_segments(video("video_90.mov"), np.array([0]))).frames[0]  # 568 x 320 (h x w)
    small = next(decode_segments(video("video_90.mov"), np.array([0]), size=(160, 284))).frames[0]
    assert small.shape == (284, 160, 3)
    # the same upright picture: compare on a coarse grid, which the scaler's filter cannot move much
    coarse = lambda image, h, w: image[: h * (image.shape[0] // h), : w * (image.shape[1] // w)].reshape(
        h, image.shape[0] // h, w, image.shape[1] // w, 3).mean(axis=(1, 3))
    assert np.abs(coarse(full, 4, 4) - coarse(small, 4, 4)).mean() < 4


def hostile_files(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((video_bytes := open(video("nasa_13013.mp4"), "rb").read())[: len(video_bytes) // 3])
    return [str(empty), str(text), str(truncated), str(tmp_path / "missing.mp4"), video("av1_video.mkv")]


def test_unopenable_files_raise_one_typed_error(tmp_path):
    for path in hostile_files(tmp_path):
        with pytest.raises(VideoDecodeError) as caught:
            info = probe_video(path)
            list(decode_segments(path, sample_frame_indices(info, FrameSampling())))
        assert caught.value.path == path and path in str(caught.value) and caught.value.reason


def test_damaged_file_is_rejected_naming_the_first_bad_frame():
    # frames 0-26 decode, 27-49 do not; 8 uniform samples are 0, 7, 14, 21, 28, ...: 28 is the first bad one
    path = video("corrupted.mp4")
    info = probe_video(path)  # the headers and the first frames are fine
    assert info.num_frames == 50
    assert next(decode_segments(path, np.arange(8))).frames.shape[0] == 8
    with pytest.raises(VideoDecodeError, match="frame 28 of 50"):
        list(decode_segments(path, sample_frame_indices(info, FrameSampling(num_frames=8)), segment_frames=4))


def test_truncated_matroska_decodes_what_it_holds_or_fails_typed(tmp_path):
    """Matroska has no index at the end: a cut file still opens; decoding must not crash or hang."""
    data = open(video("flipping_a_pancake.mkv"), "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    try:
        info = probe_video(str(cut))
        frames = sum(len(s.frame_indices) for s in decode_segments(str(cut), sample_frame_indices(info, FrameSampling())))
        assert frames == min(8, info.num_frames)
    except VideoDecodeError as error:
        assert error.path == str(cut)
