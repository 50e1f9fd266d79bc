"""What one input can do to a run: a media fault is an error row while every good input is encoded; no mutated
file fails a run; a slow decode is progress, not a stall; a decoder killed mid-input loses only what it had not
delivered, and the next run tries the input again; planned frames that end nowhere fail the run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.fs as pafs
import pytest
import ray

from media import HOSTILE_IMAGES, HOSTILE_VIDEOS, VIDEOS, frame_number, numbered_picture, write_numbered_clip
from operators.decode import VideoReader
from operators.preprocess import Preprocessing
from pipeline.child import ChildFailed, ChildProcess
from pipeline.config import EncodeConfig
from pipeline.decoder import DecodeInputs
from pipeline.encoder import EncodeTokens
from pipeline.failures import DECODER_FAILURES
from pipeline.inputs import LOCAL, list_inputs
from pipeline.plan import input_rows
from pipeline.reader import TokenReader
from pipeline.run import FramesUnaccounted, RunFailed, run
from pipeline.state import OutputState
from pipeline.index import INDEX_SCHEMA
from pipeline.schema import ERROR_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["h265_video.mp4", "video_0.mov"]
# Small files of every kind the tests carry, mutated by the fuzz test.
FUZZED = [VIDEOS / name for name in ("h265_video.mp4", "video_90.mov", "unordered.mov", "h264_10bits.mp4",
                                     "h265_10bits.mp4", "av1_video.mkv", "corrupted.mp4")] + \
         [HOSTILE_VIDEOS / name for name in ("editlist_cut.mp4", "one_frame.mp4", "vfr.mp4", "webm_live_nocues.webm",
                                             "yuv444_odd.mp4", "avi_xvid_bframes.avi", "ts_start_offset.ts")] + \
         [HOSTILE_IMAGES / name for name in ("gray16.png", "lying_sof.jpg")]
MUTATIONS = 48
LONG_FRAMES = 3000

# Ray's workers cannot import this test module: they get its classes themselves
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def link(directory: Path, names=GOOD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).symlink_to(VIDEOS / name)
    return directory


def known_faults(directory: Path) -> dict[str, str]:
    """Files that escaped the failure boundary before (each a case the review or the fuzz found) → the error
    type each must give now."""
    directory.mkdir(parents=True, exist_ok=True)
    avi = (HOSTILE_VIDEOS / "avi_xvid_bframes.avi").read_bytes()
    (directory / "unknown_fourcc.avi").write_bytes(avi.replace(b"XVID", b"ZQZQ"))  # no decoder for ZQZQ
    clip = write_numbered_clip(directory / "faststart.mp4", 50, container_options={"movflags": "faststart"})
    data = clip.read_bytes()
    clip.unlink()
    moov = data.index(b"moov")
    (directory / "moov_cut.mp4").write_bytes(data[:moov + int.from_bytes(data[moov - 4:moov], "big") // 2])
    (directory / "mdat_cut.mp4").write_bytes(data[:len(data) // 2])  # whole index, half the data: not a fault
    stsd = bytearray((HOSTILE_VIDEOS / "one_frame.mp4").read_bytes())
    at = stsd.index(b"stsd") + 16
    stsd[at:at + 4] = b"\0\0\0\0"  # the sample description's codec entry
    (directory / "damaged_stsd.mp4").write_bytes(bytes(stsd))
    seek = bytearray((VIDEOS / "h265_10bits.mp4").read_bytes())
    seek[38022] = 135  # a sample table FFmpeg then refuses every seek in (EPERM)
    (directory / "seek_refused.mp4").write_bytes(bytes(seek))
    return {"unknown_fourcc.avi": "VideoDecodeError", "moov_cut.mp4": "VideoDecodeError",
            "damaged_stsd.mp4": "VideoDecodeError", "seek_refused.mp4": "FrameDecodeError"}


def current_errors(output: Path) -> list[dict]:
    return TokenReader(str(output)).errors().to_pylist()


def mutate(source: Path, rng: random.Random) -> bytes:
    """``source``'s bytes cut at a random length, or with 1 to 16 random bytes replaced."""
    data = bytearray(source.read_bytes())
    if rng.random() < 0.5:
        return bytes(data[:rng.randrange(1, len(data))])
    for _ in range(rng.choice((1, 4, 16))):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def test_no_input_fails_a_run_and_media_faults_are_error_rows(tmp_path, tiny_clip_dir, ray_local):
    """Two good clips, the faults found before (an unknown FourCC, an MP4 cut inside its moov, a damaged
    sample description, a sample table that refuses seeks) and 48 byte-flipped or cut copies of the test
    clips and images (a fixed seed), videos and images in a folder each. Every run completes with every
    input accounted for, in shards or error rows; each failure is the input's own (a media fault, for good:
    no decoder failure), named; the good clips are encoded; an MP4 cut inside its data is read up to the
    cut, its rows saying where it stopped; the next run reads exactly the inputs left to retry (none)."""
    rng = random.Random(20261208)
    videos, images = link(tmp_path / "videos"), tmp_path / "images"
    expected = known_faults(videos)
    images.mkdir()
    for number in range(MUTATIONS):
        source = rng.choice(FUZZED)
        folder = images if source.suffix in (".png", ".jpg") else videos
        (folder / f"m{number:02d}-{source.name}").write_bytes(mutate(source, rng))
    for media, folder in (("video", videos), ("image", images)):
        output = tmp_path / f"out-{media}"
        config = EncodeConfig(input=str(folder), output=str(output), model=str(tiny_clip_dir), media=media,
                              num_frames=3, anyres=False)
        first = run(config)
        listed = len(list_inputs(str(folder), media).items)
        assert first.missing == 0 and first.inputs == listed
        assert first.encoded + first.partly_failed + first.failed + first.retryable == listed
        reader = TokenReader(str(output))
        errors = current_errors(output)
        videos_read = {Path(video.source_path).name: video for video in map(reader.load, reader.video_ids())}
        assert set(videos_read) | {Path(r["source_path"]).name for r in errors} == {p.name for p in folder.iterdir()}
        assert not [r for r in errors if r["error_type"] in DECODER_FAILURES or r["retryable"]], errors
        if media == "image":
            continue
        faults = {Path(r["source_path"]).name: r for r in errors if Path(r["source_path"]).name in expected}
        assert {name: r["error_type"] for name, r in faults.items()} == expected
        assert "ZQZQ" in faults["unknown_fourcc.avi"]["error_message"]
        assert "cannot seek" in faults["seek_refused.mp4"]["error_message"]
        assert all(name in videos_read and not [r for r in errors if Path(r["source_path"]).name == name]
                   for name in GOOD)
        cut = videos_read["mdat_cut.mp4"]
        assert cut.source_info["unreadable_tail"].startswith("the container lists 50 frames but holds the data of ")
        assert 0 < cut.source_info["num_frames"] < 50 and cut.frames[-1].frame_index == cut.source_info["num_frames"] - 1
        assert all(videos_read[name].source_info["unreadable_tail"] is None for name in GOOD)
        second = run(config)
        assert (second.skipped, second.frames, second.missing) == (listed, 0, 0), "nothing is left to retry"


def slow_decode(path: str, frames: list[int], forward_progress: bool, progress):
    """Decode ``frames`` of ``path`` in the child, each packet's progress 1 ms late (a slow machine); without
    ``forward_progress`` the decoder reports nothing (the old stall rule: only outputs count)."""
    def late() -> None:
        time.sleep(0.001)
        if forward_progress:
            progress()

    with VideoReader(path, progress=late) as reader:
        for decoded in reader.frames(np.asarray(frames)):
            yield decoded.index, frame_number(decoded.pixels), time.monotonic()


@pytest.fixture(scope="module")
def long_avi(tmp_path_factory) -> Path:
    """3000 frames of 640x480 MPEG-4 Part 2 in AVI (no pts: a frame-order stream, decoded from its start), each
    picture carrying its frame number."""
    path = tmp_path_factory.mktemp("long") / "long.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        stream.options = {"g": "300"}
        for number in range(LONG_FRAMES):
            picture = av.VideoFrame.from_ndarray(numbered_picture(number, 640, 480), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path


def test_a_slow_decode_is_progress_not_a_stall(long_avi):
    """Between frame 0 and frame 2999 of a frame-order AVI the decoder works through every frame; on a slow
    machine that takes far longer than the stall limit. It reports progress per packet, so it is not stopped;
    the same decode reporting nothing is."""
    child = ChildProcess(1.0, preload=(__name__,))
    try:
        got = list(child.run(slow_decode, str(long_avi), [0, LONG_FRAMES - 1], True))
        assert [(index, number) for index, number, _ in got] == [(0, 0), (LONG_FRAMES - 1, LONG_FRAMES - 1)]
        assert got[1][2] - got[0][2] > 2.0, "more than twice the limit between two outputs"
        with pytest.raises(ChildFailed, match="no progress for 1 s"):
            list(child.run(slow_decode, str(long_avi), [0, LONG_FRAMES - 1], False))
    finally:
        child.close()


def test_a_decoder_killed_mid_input_loses_only_what_it_had_not_delivered(long_avi):
    """The decoder stage on the long AVI, its child SIGKILLed as soon as the input's plan arrives (the kernel's
    out-of-memory killer does the same): every frame a method lacked is in a row it gets, or in its error row,
    retryable; the temporal method never gets part of a segment."""
    config = EncodeConfig(input="unused", output="unused", num_frames=6, method="prumerge,holitom:0.5",
                          segment_frames=2, decode_timeout_s=60)
    stage = DecodeInputs(config, Preprocessing(image_size=64, resize_size=64), {LOCAL: pafs.LocalFileSystem()})
    item = list_inputs(str(long_avi), "video").items[0]
    empty = OutputState(INDEX_SCHEMA.empty_table(), ERROR_SCHEMA.empty_table())
    [row] = input_rows([item], [empty, empty], config.segment_size())
    rows = []
    try:
        for out in stage(row):
            if out["kind"] == "plan":
                os.kill(stage.child._process.pid, signal.SIGKILL)
            rows.append(out)
    finally:
        stage.child.close()
    [plan] = [r for r in rows if r["kind"] == "plan"]
    sampled = plan["sampled"]
    assert len(sampled) == 6
    for spec in (0, 1):
        got = [f for r in rows if r["kind"] == "segment" for f in r["reduce"][spec]]
        lost = [f for r in rows if r["kind"] == "error" and r["spec"] == spec for f in r["error_frames"]]
        assert sorted(got + lost) == sampled, f"method {spec}: every frame once"
        assert all(r["retryable"] and r["error_type"] == "DecoderDied" for r in rows
                   if r["kind"] == "error" and r["spec"] == spec)
    segments = [sampled[i:i + 2] for i in range(0, 6, 2)]
    holitom = [r["reduce"][1] for r in rows if r["kind"] == "segment" and r["reduce"][1]]
    assert all(frames in segments for frames in holitom), "whole segments only"
    assert [r for r in rows if r["kind"] == "error"], "killed before it was done"


def test_a_stalled_or_endless_input_is_tried_again_by_the_next_run(tmp_path, tiny_clip_dir, ray_local):
    """Two FIFOs named like videos: one fed a whole clip but never closed holds the decoder in its demux pass
    (no progress: stopped after --decode-timeout-s), one fed the clip again and again is an endless stream
    (progress without end: stopped at --input-timeout-s). Both get retryable rows and the command exits 5;
    a listed folder and a file gone since it was listed are error rows for good. With the real file in the
    first FIFO's place, the next run tries it again (its second try) and encodes it, and the error table no
    longer lists it."""
    inputs = link(tmp_path / "in", GOOD[:1])
    stuck, endless = inputs / "stuck.ts", inputs / "endless.ts"
    os.mkfifo(stuck)
    os.mkfifo(endless)
    (inputs / "folder.mp4").mkdir()
    listing = tmp_path / "inputs.txt"  # a folder's listing skips FIFOs: a list names them
    listing.write_text("".join(f"{inputs / name}\n" for name in (GOOD[0], "stuck.ts", "endless.ts", "folder.mp4",
                                                                   "gone.mp4")))
    clip = (HOSTILE_VIDEOS / "ts_start_offset.ts").read_bytes()
    stop = threading.Event()

    def feed(fifo: Path, again: bool) -> None:
        try:
            with open(fifo, "wb") as pipe:  # blocks until the decoder opens it
                pipe.write(clip)
                while again and not stop.is_set():
                    pipe.write(clip)
                stop.wait(600)  # open, so the demuxer waits for more
        except OSError:  # the decoder was killed while reading
            pass

    feeders = [threading.Thread(target=feed, args=args, daemon=True) for args in ((stuck, False), (endless, True))]
    for feeder in feeders:
        feeder.start()
    output = tmp_path / "out"
    try:
        result = subprocess.run([sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(listing),
                                 "--output", str(output), "--model", str(tiny_clip_dir), "--num-frames", "4",
                                 "--decode-timeout-s", "5", "--input-timeout-s", "10"],
                                capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        for feeder in feeders:
            feeder.join(10)
    assert result.returncode == 5, result.stderr[-2000:]
    assert "to retry 2" in result.stdout and "run the same command again" in result.stdout
    errors = {Path(e["source_path"]).name: e for e in current_errors(output)}
    assert {name: (e["error_type"], e["retryable"], e["attempt"]) for name, e in errors.items()} == {
        "stuck.ts": ("DecoderStalled", True, 1), "endless.ts": ("DecoderTimeout", True, 1),
        "folder.mp4": ("IsADirectoryError", False, 1), "gone.mp4": ("FileNotFoundError", False, 1)}
    assert "still working after 10 s" in errors["endless.ts"]["error_message"]
    stuck.unlink()
    shutil.copy(HOSTILE_VIDEOS / "ts_start_offset.ts", stuck)
    listing.write_text("".join(f"{inputs / name}\n" for name in (GOOD[0], "stuck.ts", "folder.mp4", "gone.mp4")))
    again = run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), num_frames=4))
    assert (again.encoded, again.skipped, again.retryable) == (1, 3, 0)
    assert sorted(Path(e["source_path"]).name for e in current_errors(output)) == ["endless.ts", "folder.mp4",
                                                                                 "gone.mp4"]
    reader = TokenReader(str(output))
    [retried] = [v for v in reader.video_ids() if reader.load(v).source_path == str(stuck)]
    assert [f.frame_index for f in reader.load(retried).frames] == [0, 83, 166, 249]


class DroppingEncodeTokens(EncodeTokens):
    """The job's encoder stage with a fault: the first method never reduces frame 9."""

    def __call__(self, batch):
        reduce = np.empty(len(batch["reduce"]), dtype=object)
        for row, per_method in enumerate(batch["reduce"]):
            reduce[row] = [np.asarray([f for f in per_method[0] if f != 9], dtype=np.int64), *per_method[1:]]
        return super().__call__({**batch, "reduce": reduce})


def test_a_planned_frame_that_ends_nowhere_fails_the_run_naming_it(tmp_path, tiny_clip_dir, ray_local):
    inputs = link(tmp_path / "in", GOOD[:1])
    output = tmp_path / "out"
    with pytest.raises(RunFailed, match="ended in neither shards nor error rows") as failure:
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=4,
                         batch_size=4), encoder_stage=DroppingEncodeTokens)
    assert isinstance(failure.value.__cause__, FramesUnaccounted)
    [line] = failure.value.__cause__.lines
    assert line == f"{inputs / GOOD[0]} (prumerge): frame 9"
    record = json.loads((output / "manifest.json").read_text())
    assert record["status"] == "failed" and "ended in neither shards nor error rows" in record["error"]
    resumed = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=4))
    assert (resumed.encoded, resumed.frames) == (1, 1), "the next run encodes the frame that ended nowhere"
