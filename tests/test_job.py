"""The Ray Data job end to end: real videos and hostile files, output contract, resume, kill -9, images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from operators.sampling import FrameSampling, sample_frame_indices
from pipeline.config import EncodeConfig
from pipeline.reader import TokenReader
from pipeline.run import RunFailed, RunSetupError, run
from pipeline.schema import ERROR_SCHEMA, read_file_metadata, shard_schema
from media import DECODABLE, VIDEOS, decode_frame, video, video_info

ROOT = Path(__file__).resolve().parents[1]
UNDECODABLE = ["empty.mp4", "notes.mp4", "truncated.mp4"]
DAMAGED = ["corrupted.mp4"]  # frames 0-27 decode, the rest do not: kept and failed frames
KEY = ["video_id", "frame_index", "tile_index"]


def make_video_inputs(directory: Path, names=None) -> Path:
    """The test videos (linked, not copied) plus hostile files and a duplicate basename in a subfolder."""
    directory.mkdir(parents=True)
    for path in sorted(VIDEOS.iterdir()):
        if names is None or path.name in names:
            (directory / path.name).symlink_to(path)
    if names is None:
        (directory / "empty.mp4").write_bytes(b"")
        (directory / "notes.mp4").write_text("not a video\n")
        data = (VIDEOS / "nasa_13013.mp4").read_bytes()
        (directory / "truncated.mp4").write_bytes(data[: len(data) // 3])
        (directory / "sub").mkdir()
        shutil.copy(VIDEOS / "video_0.mov", directory / "sub" / "video_0.mov")
        (directory / "README.txt").write_text("ignored: not a video extension\n")
    return directory


def read(output: Path, sub: str = "shards"):
    return pads.dataset(output / sub, format="parquet").to_table()


def expected_frames(name: str, sampling: FrameSampling) -> list[int]:
    return sample_frame_indices(video_info(video(name)), sampling).tolist()


def job_command(inputs: Path, output: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(inputs), "--output", str(output),
            "--model", str(model), *extra]


def test_every_input_lands_in_shards_or_errors(tmp_path, tiny_clip_dir, ray_local):
    inputs = make_video_inputs(tmp_path / "in")
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=4, batch_size=5)
    summary = run(config)

    shards, errors = read(output), read(output, "errors")
    by_path = {}
    for row in shards.select(["source_path", "video_id"]).to_pylist() + errors.select(["source_path", "video_id"]).to_pylist():
        by_path.setdefault(Path(row["source_path"]).relative_to(inputs).as_posix(), set()).add(row["video_id"])
    assert sorted(by_path) == sorted(DECODABLE + UNDECODABLE + DAMAGED + ["sub/video_0.mov"])
    assert all(len(ids) == 1 for ids in by_path.values())
    assert by_path["video_0.mov"] != by_path["sub/video_0.mov"], "same basename, different ids"

    shard_ids = set(shards["video_id"].to_pylist())
    error_rows = errors.to_pylist()
    assert {Path(r["source_path"]).name for r in error_rows} == set(UNDECODABLE + DAMAGED)
    whole_input_errors = {r["video_id"] for r in error_rows if not r["frame_indices"]}
    assert not shard_ids & whole_input_errors, "an input that failed as a whole has no shard rows"
    damaged = [r for r in error_rows if Path(r["source_path"]).name == "corrupted.mp4"]
    assert [r["frame_indices"] for r in damaged] == [[32, 49]] and "cannot be decoded" in damaged[0]["error_message"]
    assert all(r["error_type"] and r["error_message"] for r in error_rows)

    rows = shards.to_pylist()
    for name in DECODABLE:
        frames = sorted((r for r in rows if r["source_path"] == str(inputs / name)), key=lambda r: r["frame_index"])
        assert [r["frame_index"] for r in frames] == expected_frames(name, FrameSampling(num_frames=4))
        assert np.all(np.diff([r["timestamp_s"] for r in frames]) > 0)
    for r in rows:
        assert (r["tile_index"], r["grid_rows"], r["grid_cols"]) == (-1, 1, 1)
        assert r["num_tokens"] == len(r["tokens"]) == len(r["positions"]) == len(r["scores"]) >= 1
        assert r["positions"][-1] == -1 and all(len(t) == 32 for t in r["tokens"])

    same_clip = [sorted((r for r in rows if r["video_id"] in by_path[p]), key=lambda r: r["frame_index"])
                 for p in ("video_0.mov", "sub/video_0.mov")]
    assert [r["tokens"] for r in same_clip[0]] == [r["tokens"] for r in same_clip[1]], "same content, same tokens"

    first_shard = next((output / "shards").glob("*.parquet"))
    parquet = pq.ParquetFile(first_shard)
    assert parquet.schema_arrow.remove_metadata() == shard_schema(32)
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    meta = read_file_metadata(parquet.schema_arrow)
    assert meta["schema_version"] == "5" and meta["model"] == str(tiny_clip_dir) and meta["media"] == "video"
    assert (meta["layer"], meta["method"], meta["hidden_size"], meta["patch_grid"]) == (-2, "prumerge", 32, [24, 24])
    assert pq.read_schema(next((output / "errors").glob("*.parquet"))).remove_metadata() == ERROR_SCHEMA

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["num_frames"] == 4 and "torch" in manifest["versions"]
    assert (summary.inputs, summary.encoded, summary.partly_failed, summary.failed, summary.missing) == (17, 13, 1, 3, 0)
    assert summary.frames == len({(r["video_id"], r["frame_index"]) for r in rows})
    assert not list(output.rglob(".tmp-*"))
    assert len(pd.read_parquet(output / "shards")) == len(rows)  # plain Parquet readers open the directory
    assert ray_local.data.read_parquet(str(output / "shards")).count() == len(rows)

    # Re-running the same command commits nothing new and skips everything.
    files_before = sorted(p.name for p in output.rglob("*.parquet"))
    again = run(config)
    assert (again.encoded, again.failed, again.skipped, again.rows) == (0, 0, 17, 0)
    assert sorted(p.name for p in output.rglob("*.parquet")) == files_before


def test_kill_9_then_rerun_is_exactly_once_and_deterministic(tmp_path, tiny_clip_dir, ray_local):
    names = ["nasa_13013.mp4", "flipping_a_pancake.mkv", "bt709_full_range.mp4", "h265_video.mp4"]
    inputs = make_video_inputs(tmp_path / "in", names)
    flags = ["--fps", "2", "--batch-size", "2", "--frames-per-shard", "2"]

    # Reference: one uninterrupted run in this process.
    reference = tmp_path / "reference"
    run(EncodeConfig(input=str(inputs), output=str(reference), model=str(tiny_clip_dir), num_frames=None, fps=2.0,
                     batch_size=2, frames_per_shard=2))

    output = tmp_path / "out"
    job = subprocess.Popen(job_command(inputs, output, tiny_clip_dir, *flags), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((output / "shards").glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    committed_at_kill = len(list((output / "shards").glob("part-*.parquet")))
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert committed_at_kill >= 2, "the job should have committed shards before the kill"

    for path in output.rglob("part-*.parquet"):
        pq.read_table(path)  # every visible file is complete
    resumed = subprocess.run(job_command(inputs, output, tiny_clip_dir, *flags), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    got, want = read(output).sort_by([(k, "ascending") for k in KEY]), read(reference).sort_by([(k, "ascending") for k in KEY])
    keys = list(zip(*(got[k].to_pylist() for k in KEY)))
    assert len(keys) == len(set(keys)), "every (video_id, frame_index, tile_index) exactly once"
    assert keys == list(zip(*(want[k].to_pylist() for k in KEY)))
    assert got["positions"].to_pylist() == want["positions"].to_pylist()
    for a, b in zip(got["tokens"].to_pylist(), want["tokens"].to_pylist()):
        np.testing.assert_allclose(np.array(a, dtype=np.float32), np.array(b, dtype=np.float32), rtol=2e-3, atol=2e-3)
    assert not list(output.rglob(".tmp-*"))


def test_images_job_tiles_and_errors(tmp_path, tiny_clip_dir, ray_local):
    from PIL import Image


    inputs = tmp_path / "images"
    inputs.mkdir()
    frame = decode_frame(video("bt709_full_range.mp4"))  # 1280 x 720
    Image.fromarray(frame).save(inputs / "wide.jpg", quality=90)
    Image.fromarray(frame[:, :400]).save(inputs / "tall.png")
    Image.fromarray(frame[:300, :300]).save(inputs / "small.webp")
    Image.new("1", (16384, 16384)).save(inputs / "bomb.png")
    (inputs / "fake.jpg").write_text("not an image")
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in sorted(inputs.iterdir())) + "\n")

    output = tmp_path / "out"
    summary = run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), media="image",
                               anyres=True, batch_size=2))
    assert (summary.inputs, summary.encoded, summary.partly_failed, summary.failed) == (5, 3, 0, 2)
    rows = read(output).to_pylist()
    grids = {}
    for r in rows:
        grids.setdefault(Path(r["source_path"]).name, []).append((r["tile_index"], r["grid_rows"], r["grid_cols"]))
    assert sorted(grids["wide.jpg"]) == [(t, 2, 2) for t in range(-1, 4)]  # 1280x720 fits 672x672 best
    assert sorted(grids["tall.png"]) == [(t, 2, 2) for t in range(-1, 4)]  # 400x720: 373x672 beats 336x604
    assert sorted(grids["small.webp"]) == [(t, 2, 1) for t in range(-1, 2)]  # 300x300 fits all: 336x672 is first
    failures = {Path(r["source_path"]).name: r for r in read(output, "errors").to_pylist()}
    assert set(failures) == {"bomb.png", "fake.jpg"} and "bomb" in failures["bomb.png"]["error_message"]


def test_offline_model_fails_fast_naming_the_flag(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(VIDEOS), "--output", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "--model PATH" in result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_arguments_exit_2(tmp_path, tiny_clip_dir):
    result = subprocess.run(job_command(VIDEOS, tmp_path / "o", tiny_clip_dir, "--method", "fixed"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--budget" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--anyres", "--pinpoints", "336x672,300x600"], "--pinpoints 300x600: each side must be a multiple of the model's "
                                                     "input size 336 px"),
    (["--method", "fixed", "--budget", "577"], "--budget 577: the model has 576 patches per view; use 1..576"),
    (["--pinpoints", "336x"], "--pinpoints must look like"),
    (["--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    (["--fps", "-1"], "--fps must be > 0, got -1.0"),
    (["--key-frame-tolerance-s", "1"], "--key-frame-tolerance-s is only used with --key-frames"),
    (["--device", "cpu", "--encoder-threads", "0"], "--encoder-threads must be >= 1"),
])
def test_settings_the_model_cannot_serve_exit_2_before_any_work(tmp_path, tiny_clip_dir, flags, message):
    result = subprocess.run(job_command(VIDEOS, tmp_path / "o", tiny_clip_dir, *flags),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o").exists() and "Started a local Ray" not in result.stderr


def test_mixing_settings_into_one_output_is_refused(tmp_path, tiny_clip_dir, ray_local):
    inputs = make_video_inputs(tmp_path / "in", ["h265_video.mp4"])
    output = tmp_path / "out"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=2))
    with pytest.raises(RunSetupError, match="different settings:\n  method: existing 'prumerge', this run 'prumerge[+]'\n"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=2,
                         method="prumerge+"))
    with pytest.raises(RunSetupError, match="different settings:\n  sampling: "):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=2, key_frames=True))


def test_key_frame_sampling_through_the_job(tmp_path, tiny_clip_dir, ray_local):
    """--key-frames: the rows are the key frames the sampling chose, with their own times; the output says so."""
    inputs = make_video_inputs(tmp_path / "in", ["flipping_a_pancake.mkv"])
    sampling = FrameSampling(num_frames=4, key_frames=True)
    run(EncodeConfig(input=str(inputs), output=str(tmp_path / "out"), model=str(tiny_clip_dir), num_frames=4,
                     key_frames=True))
    info = video_info(video("flipping_a_pancake.mkv"))
    expected = expected_frames("flipping_a_pancake.mkv", sampling)
    assert expected != expected_frames("flipping_a_pancake.mkv", FrameSampling(num_frames=4)), "a clip where it matters"
    rows = read(tmp_path / "out").sort_by("frame_index").to_pylist()
    assert [row["frame_index"] for row in rows] == expected
    assert set(expected) & set(info.key_frame_indices.tolist())
    assert [row["timestamp_s"] for row in rows] == info.timestamps_s[expected].tolist()
    metadata = read_file_metadata(pq.read_schema(next((tmp_path / "out" / "shards").rglob("*.parquet"))))
    assert metadata["sampling"]["key_frames"] is True


def test_an_output_of_an_older_version_with_only_errors_is_refused(tmp_path, tiny_clip_dir):
    """Error files record how they were made too; one without that record (an older version's, whose
    ids were made another way) is refused before any work, as shards are."""
    (tmp_path / "out" / "errors").mkdir(parents=True)
    row = {"video_id": "bad-14ac03ef1d75", "source_path": str(tmp_path / "bad.mp4"), "error_type": "VideoDecodeError",
           "error_message": "cannot open the file as a video", "frame_indices": []}
    pq.write_table(pa.Table.from_pylist([row], schema=ERROR_SCHEMA), tmp_path / "out" / "errors" / "part-0.parquet")
    with pytest.raises(RunSetupError, match="files of an older version, which record no settings"):
        run(EncodeConfig(input=str(VIDEOS), output=str(tmp_path / "out"), model=str(tiny_clip_dir)))


def test_damaged_video_keeps_the_frames_that_decode(tmp_path, tiny_clip_dir, ray_local):
    """corrupted.mp4 decodes frames 0-27 of 50: of 8 samples 4 are kept and 4 are one error row naming them."""
    inputs = make_video_inputs(tmp_path / "in", ["corrupted.mp4"])
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=8)
    summary = run(config)
    assert sorted(read(output)["frame_index"].to_pylist()) == [0, 7, 14, 21]
    (error,) = read(output, "errors").to_pylist()
    assert error["frame_indices"] == [28, 35, 42, 49] and error["error_type"] == "FrameDecodeError"
    assert error["error_message"].startswith("frames 28-49 (4 sampled): cannot be decoded: ")
    assert (summary.encoded, summary.partly_failed, summary.failed) == (0, 1, 0), "one input, counted once"
    again = run(config)  # recorded failures are not retried; nothing is left to do
    assert (again.rows, again.error_rows, again.skipped) == (0, 0, 1)


def test_a_run_explains_itself_in_its_log_and_keeps_its_record(tmp_path, tiny_clip_dir, ray_local):
    """Plan, each failure with its reason, worker output and the summary go to OUT/logs/<run-id>.log;
    every run keeps OUT/runs/<run-id>.json and manifest.json is the newest; a damaged video whose good
    segments landed counts as partly failed, not as both encoded and failed."""
    inputs = make_video_inputs(tmp_path / "in", ["h265_video.mp4", "corrupted.mp4"])
    (inputs / "notes.mp4").write_text("not a video\n")
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=8)
    first = run(config)
    second = run(config)
    assert (first.inputs, first.encoded, first.partly_failed, first.failed, first.skipped) == (3, 1, 1, 1, 0)
    assert (second.encoded, second.partly_failed, second.failed, second.skipped, second.skipped_failed) == (0, 0, 0, 3, 2)

    records = [json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json"))]
    assert len(records) == 2 and records[0]["run_id"] < records[1]["run_id"]
    assert json.loads((output / "manifest.json").read_text()) == records[1]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert records[0]["summary"]["partly_failed"] == 1 and records[1]["summary"]["skipped"] == 3
    assert records[0]["config"]["num_frames"] == 8 and records[0]["config"]["device"] == "cpu"
    assert "torch" in records[0]["versions"] and records[0]["started_at"] <= records[0]["finished_at"]
    logs = sorted((output / "logs").glob("*.log"))
    assert [p.stem for p in logs] == [r["run_id"] for r in records]
    assert [r["log"] for r in records] == [str(p) for p in logs]

    text = logs[0].read_text()
    errors = {Path(r["source_path"]).name: r for r in read(output, "errors").to_pylist()}
    broken = errors["notes.mp4"]
    assert f"failed: {inputs / 'notes.mp4'}: {broken['error_type']}: {broken['error_message']}" in text
    for row in read(output, "errors").to_pylist():
        if row["frame_indices"]:
            frames = ", ".join(map(str, row["frame_indices"]))
            assert f"failed: {inputs / 'corrupted.mp4'}: FrameDecodeError: " in text and f"(frames {frames})" in text
    assert "inputs: 3 found, 3 to read (0 with frames from earlier runs" in text
    assert "inputs 3: encoded 1, partly failed 1, failed 1, to retry 0, skipped (already done) 0" in text
    # What a worker process printed reached this driver's log, with the task it came from.
    assert any(" pipeline.workers: (" in line and "EncodeTokens" in line and "pid=" in line
               for line in text.splitlines())
    later = logs[1].read_text()
    assert "inputs: 3 found, 0 to read (0 with frames from earlier runs" in later
    assert "inputs skipped with failures for good from earlier runs: 2" in later
    assert "inputs 3: encoded 0, partly failed 0, failed 0, to retry 0, skipped (already done) 3, 2 of them with error " \
           "rows" in later
    assert "failed: " not in later, "a run logs the failures it committed, not earlier runs'"


def test_a_run_that_fails_records_it_and_its_log_holds_the_worker_traceback(tmp_path, tiny_clip_dir, ray_local):
    """A checkpoint without one vision weight passes the driver's config check but kills the encoder
    actor: the run raises, its record says failed and why, and the actor's traceback is in its log."""
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged-clip"
    shutil.copytree(tiny_clip_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0.self_attn.k_proj.weight" not in k},
              damaged / "model.safetensors", metadata={"format": "pt"})
    inputs = make_video_inputs(tmp_path / "in", ["h265_video.mp4"])
    output = tmp_path / "out"
    with pytest.raises(RunFailed, match="not a complete clip vision checkpoint") as failure:
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(damaged), num_frames=2))

    (record_path,) = (output / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed" and "not a complete clip vision checkpoint" in record["error"]
    assert failure.value.run_id == record["run_id"] and failure.value.log == record["log"]
    assert json.loads((output / "manifest.json").read_text()) == record
    text = Path(record["log"]).read_text()
    assert f"run {record['run_id']} failed: " in text
    worker_lines = [line for line in text.splitlines() if " pipeline.workers: (" in line and "EncodeTokens" in line]
    assert any("ValueError: " in line and "not a complete clip vision checkpoint" in line for line in worker_lines)


def test_an_interrupted_run_logs_the_failures_it_committed_and_records_itself(tmp_path, tiny_clip_dir):
    """Ctrl-C (SIGINT to the job's process group) after the first error file landed: the record says
    interrupted, and every error row committed so far is named in the log with its reason, which keeps
    INFO lines even though the console was asked for warnings only."""
    inputs = make_video_inputs(tmp_path / "in", ["nasa_13013.mp4", "flipping_a_pancake.mkv"])
    for i in range(4):  # listed first: their error rows are committed while the videos are still being encoded
        (inputs / f"0-junk{i}.mp4").write_text("not a video\n")
    output = tmp_path / "out"
    job = subprocess.Popen(job_command(inputs, output, tiny_clip_dir, "--fps", "4",
                                       "--batch-size", "2", "--frames-per-shard", "1", "--log-level", "WARNING"),
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((output / "errors").glob("part-*.parquet")) and job.poll() is None:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode != 0, "interrupted before it finished"

    (record_path,) = (output / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "interrupted" and "KeyboardInterrupt" in record["error"], record
    text = Path(record["log"]).read_text()
    assert "inputs: 6 found, 6 to read" in text, "the file keeps INFO whatever the console shows"
    committed = read(output, "errors").to_pylist()
    assert committed, "the job was stopped after an error file landed"
    for row in committed:
        assert f"failed: {row['source_path']}: {row['error_type']}: {row['error_message']}" in text
    assert f"run {record['run_id']} interrupted" in text
    assert "inputs: 6 found" not in stderr, "the console shows warnings and errors only"


def test_runs_that_cannot_start_write_nothing_and_a_started_run_is_recorded_at_once(tmp_path, tiny_clip_dir):
    """A missing input, an input with no media, and an output that cannot be written are refused before
    anything is written (exit 2 from the command line); a run that starts writes its record at once,
    so even a run killed outright leaves one (status running)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no media here\n")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "runs").write_text("a file where the runs/ directory belongs\n")
    inputs = make_video_inputs(tmp_path / "in", ["h265_video.mp4"])
    for source, output, reason in ((tmp_path / "missing", tmp_path / "o1", "does not exist"),
                                   (empty, tmp_path / "o2", "holds no video files"),
                                   (inputs, blocked, "cannot write to the output")):
        with pytest.raises(RunSetupError, match=reason):
            run(EncodeConfig(input=str(source), output=str(output), model=str(tiny_clip_dir), num_frames=2))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert sorted(p.name for p in blocked.iterdir()) == ["lease", "logs", "runs"]  # runs/ is still the file
    assert [json.loads(p.read_text())["released"] for p in (blocked / "lease").iterdir()] == [True], \
        "the lease was given back"
    assert [p.stat().st_size for p in (blocked / "logs").iterdir()] == [0], "at most an empty log is left"
    result = subprocess.run(job_command(empty, tmp_path / "o3", tiny_clip_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "holds no video files" in result.stderr and not (tmp_path / "o3").exists()

    output = tmp_path / "out"
    job = subprocess.Popen(job_command(inputs, output, tiny_clip_dir, "--num-frames", "2"), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((output / "runs").glob("*.json")) and job.poll() is None:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    (record,) = [json.loads(p.read_text()) for p in (output / "runs").glob("*.json")]
    assert record["status"] == "running" and Path(record["log"]).exists()


def child_decoders() -> set[int]:
    """pids of the decoding child processes (`python -m pipeline.child`) running now."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"pipeline.child" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_hanging_input_becomes_an_error_row_within_the_limit(tmp_path, tiny_clip_dir, ray_local):
    """A FIFO named like a video blocks FFmpeg's open forever: the decoder is stopped after
    --decode-timeout-s and the input is an error row; the other input is encoded and committed while the
    decoder hangs (writes never wait for a CPU the actors hold)."""
    inputs = make_video_inputs(tmp_path / "in", ["h265_video.mp4"])
    os.mkfifo(inputs / "stuck.mp4")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{inputs / 'h265_video.mp4'}\n{inputs / 'stuck.mp4'}\n")
    output = tmp_path / "out"
    first_shard: list[float] = []

    def watch_for_the_first_shard():
        while not first_shard and time.monotonic() - started < 180:
            if list((output / "shards").glob("part-*.parquet")):
                first_shard.append(time.monotonic())
            time.sleep(0.2)

    started = time.monotonic()
    watcher = threading.Thread(target=watch_for_the_first_shard)
    watcher.start()
    # 60 s: the encoder actor must start (a fresh worker importing torch, up to ~30 s on a loaded 2-core
    # machine) and commit the other input before the hung decoder is stopped.
    summary = run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), num_frames=2,
                               decode_timeout_s=60, frames_per_shard=1, batch_size=2))
    finished = time.monotonic()
    watcher.join()
    assert finished - started < 180
    assert first_shard and finished - first_shard[0] > 10, "the other input was committed while the decoder hung"
    (error,) = read(output, "errors").to_pylist()
    assert (Path(error["source_path"]).name, error["error_type"], error["frame_indices"]) == ("stuck.mp4", "DecoderStalled", [])
    assert error["error_message"] == ("no progress for 60 s: stopped as hung (decoder failure 1 of 3: the next run "
                                      "tries again)")
    assert (error["retryable"], error["attempt"]) == (True, 1)
    assert (summary.encoded, summary.failed, summary.retryable) == (1, 0, 1)


def test_a_decoder_killed_mid_video_becomes_an_error_row(tmp_path, tiny_clip_dir, ray_local):
    """The only input hangs; its decoder is killed (as the out-of-memory killer would): the input's error
    row says so, and the job ends normally."""
    os.mkfifo(tmp_path / "stuck.mp4")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{tmp_path / 'stuck.mp4'}\n")
    before = child_decoders()
    killed = []

    def kill_the_decoder():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            new = child_decoders() - before
            if new:
                time.sleep(15)  # started, imported, and blocked opening the FIFO
                for pid in new:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(new)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_the_decoder)
    killer.start()
    output = tmp_path / "out"
    summary = run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), num_frames=2,
                               decode_timeout_s=300))
    killer.join()
    assert killed
    (error,) = read(output, "errors").to_pylist()
    assert error["error_type"] == "DecoderDied" and error["frame_indices"] == [] and error["retryable"]
    assert error["error_message"].startswith("the decoder process killed by SIGKILL")
    assert (summary.failed, summary.retryable) == (0, 1), "a killed decoder is not the input's fault for good"


def test_an_input_that_cannot_be_read_is_an_error_row_to_retry_and_the_run_completes(tmp_path, tiny_clip_dir,
                                                                                     ray_local):
    """An input on a store that cannot be reached when it is read: after its reads are retried, the input gets
    an error row a later run tries again (never one for good: the network's fault, not the input's; it is not
    counted as a decoder failure), and the run completes."""
    listing = tmp_path / "inputs.txt"
    listing.write_text("s3://test:test@bucket/videos/clip.mp4?endpoint_override=127.0.0.1:1&scheme=http"
                       "&region=us-east-1\n")
    output = tmp_path / "out"
    summary = run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), num_frames=2))
    assert (summary.retryable, summary.failed) == (1, 0)
    [row] = TokenReader(str(output)).errors().to_pylist()
    assert (row["error_type"], row["retryable"], row["attempt"], row["frame_indices"]) == ("InputReadError", True, 1, [])
    assert "Could not connect" in row["error_message"] and "test:test" not in row["error_message"]
    assert "every later run tries again" in row["error_message"]
    assert json.loads((output / "manifest.json").read_text())["status"] == "completed"


def test_each_file_is_encoded_once_under_one_id_however_it_is_listed(tmp_path, tiny_clip_dir, ray_local, s3_client):
    """A bracketed folder is a folder, a symlink cycle adds nothing, a wider root and a list naming the same
    files three ways re-encode nothing, a non-UTF-8 name is an error row, and awkward S3 keys are read
    through the filesystem that listed them."""
    from PIL import Image

    root = tmp_path / "in"
    photos = root / "photos [2020]"
    photos.mkdir(parents=True)
    frame = decode_frame(video("bt709_full_range.mp4"))
    Image.fromarray(frame[:200, :300]).save(photos / "a.jpg")
    Image.fromarray(frame[200:400, :300]).save(photos / "b.png")
    (photos / os.fsdecode(b"caf\xe9.png")).write_bytes((photos / "b.png").read_bytes())
    (photos / "loop").symlink_to(root)
    output = tmp_path / "out"

    def encode(spec: str):
        return run(EncodeConfig(input=spec, output=str(output), model=str(tiny_clip_dir), media="image", batch_size=4))

    first = encode(str(photos))
    assert (first.inputs, first.encoded, first.failed, first.listing_notes) == (3, 2, 1, 1)
    ids = {r["source_path"]: r["video_id"] for r in read(output).to_pylist()}
    assert sorted(ids) == [str(photos / "a.jpg"), str(photos / "b.png")]
    (error,) = read(output, "errors").to_pylist()
    assert error["error_type"] == "InvalidPath" and error["source_path"] == str(photos) + "/caf\\xe9.png"

    Image.fromarray(frame[400:600, :300]).save(root / "c.webp")
    wider = encode(str(root))
    assert (wider.inputs, wider.skipped, wider.skipped_failed, wider.encoded) == (4, 3, 1, 1)

    listed = tmp_path / "list.txt"
    listed.write_text(f"in/photos [2020]/a.jpg\n./in/photos [2020]/a.jpg\n/{photos}/a.jpg\n{root}/c.webp\n")
    again = encode(str(listed))
    assert (again.inputs, again.skipped, again.duplicates, again.encoded, again.failed) == (2, 2, 2, 0, 0)
    shards = read(output).to_pandas()
    assert not shards.duplicated(KEY).any() and shards["video_id"].nunique() == 3

    client, credentials, options = s3_client
    client.create_bucket(Bucket="jobs")
    keys = ["media/a b#1?.jpg", "media/café.jpg"]
    for key in keys:
        client.put_object(Bucket="jobs", Key=key, Body=(photos / "a.jpg").read_bytes())
    s3_output = tmp_path / "s3-out"
    remote = run(EncodeConfig(input=f"s3://{credentials}jobs/media?{options}", output=str(s3_output),
                              model=str(tiny_clip_dir), media="image", batch_size=4))
    assert (remote.inputs, remote.encoded, remote.failed) == (2, 2, 0)
    recorded = (s3_output / "manifest.json").read_text() + "".join(p.read_text() for p in (s3_output / "logs").iterdir())
    assert "jobs/media" in recorded and credentials not in recorded, "credentials are never written down"
    rows = read(s3_output).to_pylist()
    assert sorted(r["source_path"] for r in rows) == ["s3://jobs/media/a%20b%231%3F.jpg", "s3://jobs/media/caf%C3%A9.jpg"]
    local_tokens = next(r["tokens"] for r in read(output).to_pylist() if r["source_path"].endswith("a.jpg"))
    assert all(r["tokens"] == local_tokens for r in rows), "the same bytes give the same tokens"
