"""Commits at scale: whole frames per shard, the commit index, adoption after a crash between commits,
damaged files, the output lease, pinned model revisions, and an object-store output (local S3 server)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

import pipeline.run
from pipeline.config import EncodeConfig
from pipeline.index import commit_errors, merge_index_parts
from pipeline.lease import Fence, LeaseLost, OutputLease, holders, lease_path
from pipeline.reader import ShardFormatError, TokenReader
from pipeline.run import OutputBusy, RunFailed, RunSetupError, run
from pipeline.store import DamagedOutputError, Store, parquet_bytes, publish
from pipeline.schema import ERROR_SCHEMA, METADATA_KEY, expected_tiles
from damage import flip_byte, inside_tokens_page
from media import decode_frame, video

ROOT = Path(__file__).resolve().parents[1]
KEY = [("video_id", "ascending"), ("frame_index", "ascending"), ("tile_index", "ascending")]
CLIPS = ["h265_video.mp4", "video_0.mov", "nasa_13013.mp4"]


def link_inputs(directory: Path, names=CLIPS) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        (directory / name).symlink_to(video(name))
    return directory


def shard_rows(output: Path) -> pa.Table:
    return pads.dataset(output / "shards", format="parquet").to_table().sort_by(KEY)


def job(inputs: Path, output: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(inputs),
                           "--output", str(output), "--model", str(model), "--num-frames", "3", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_clip_dir, ray_local):
    """Three clips, 3 frames each, one frame per shard file: (inputs, output)."""
    inputs = link_inputs(tmp_path_factory.mktemp("commit") / "in")
    output = tmp_path_factory.mktemp("commit") / "reference"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3, batch_size=2,
                     frames_per_shard=1))
    return inputs, output


def test_anyres_frames_are_never_split_whatever_the_batch_and_block_size(tmp_path, tiny_clip_dir, ray_local):
    """Large batches, blocks Ray must cut (20 KB), shards cut by bytes (20 KB): every frame's views land in one
    file, complete, and every image once."""
    inputs = tmp_path / "images"
    inputs.mkdir()
    frame = decode_frame(video("bt709_full_range.mp4"))
    for i in range(12):
        Image.fromarray(np.roll(frame, 37 * i, axis=1)).save(inputs / f"image{i:02d}.png")
    output = tmp_path / "out"
    context = ray_local.data.DataContext.get_current()
    block_size = context.target_max_block_size
    context.target_max_block_size = 20_000
    try:
        summary = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), media="image",
                                   anyres=True, method="fixed", budget=40, batch_size=12, frames_per_shard=64,
                                   shard_mb=0.02))
    finally:
        context.target_max_block_size = block_size
    assert summary.encoded == 12
    files: dict[tuple[str, int], set[str]] = {}
    tiles: dict[tuple[str, int], list[int]] = {}
    grid = {}
    for path in (output / "shards").glob("*.parquet"):
        table = pq.read_table(path, columns=["video_id", "frame_index", "tile_index", "grid_rows", "grid_cols"])
        for row in table.to_pylist():
            key = (row["video_id"], row["frame_index"])
            files.setdefault(key, set()).add(path.name)
            tiles.setdefault(key, []).append(row["tile_index"])
            grid[key] = (row["grid_rows"], row["grid_cols"])
    assert len(files) == 12 and len(set().union(*files.values())) > 2, "several shard files"
    assert all(len(names) == 1 for names in files.values()), "a frame's views in one file"
    assert all(sorted(t) == expected_tiles(*grid[key], anyres=True) and grid[key] != (1, 1)
               for key, t in tiles.items())
    reader = TokenReader(str(output))
    assert all(len(reader.load(v).frames[0].tiles) == 4 for v in reader.video_ids())


def test_the_index_lets_a_reader_open_only_the_shards_of_its_videos(reference):
    _, output = reference
    reader = TokenReader(str(output))
    assert reader.shards_opened == 0 and len(reader.files) == 9
    [index] = (output / "index").glob("*.parquet")
    assert index.name.startswith("run-"), "a completed run merges its index parts into one file"
    video_id = reader.video_ids()[0]
    reader.load(video_id)
    assert reader.shards_opened == len({name for name, _ in reader.row_groups(video_id)}) == 3


def drop_index_entries(output: Path, shard_name: str) -> None:
    """What a writer killed between a shard and its index entry leaves: the shard, not named by the index."""
    for index in (output / "index").glob("*.parquet"):
        table = pq.read_table(index)
        pq.write_table(table.filter(pc.not_equal(table["file"], shard_name)), index)


def with_an_uncommitted_shard(original: Path, output: Path) -> Path:
    """A copy of ``original`` whose first shard is not in the index (a crash between the two writes)."""
    shutil.copytree(original, output)
    shard = sorted((output / "shards").glob("*.parquet"))[0]
    drop_index_entries(output, shard.name)
    return shard


def test_a_crash_between_shard_and_index_is_healed_by_the_next_run(reference, tmp_path, tiny_clip_dir):
    inputs, original = reference
    output = tmp_path / "out"
    with_an_uncommitted_shard(original, output)
    (output / "shards" / ".tmp-0123-part-x.parquet").write_bytes(b"PAR1 half written")
    reader = TokenReader(str(output))
    assert len(reader.files) == 8, "a shard the index does not name is not committed"

    summary = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3))
    assert (summary.rows, summary.skipped) == (0, 3), "adopted, not encoded again"
    assert not list(output.rglob(".tmp-*"))
    assert shard_rows(output).equals(shard_rows(original))
    assert len(TokenReader(str(output)).files) == 9


def test_a_lost_index_and_a_stale_copy_of_a_committed_shard_are_healed_without_duplicates(reference, tmp_path,
                                                                                           tiny_clip_dir):
    """No index at all: the reader refuses (not an empty dataset); the next run adopts every shard, but
    deletes an un-indexed copy of frames committed elsewhere (a write stopped after they were)."""
    inputs, original = reference
    output = tmp_path / "out"
    shutil.copytree(original, output)
    shutil.rmtree(output / "index")
    shard = sorted((output / "shards").glob("*.parquet"))[0]
    shutil.copy(shard, output / "shards" / "part-stale-copy.parquet")
    with pytest.raises(ShardFormatError, match=r"10 shard file\(s\) but no commit index"):
        TokenReader(str(output))
    summary = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3))
    assert (summary.rows, summary.skipped) == (0, 3)
    names = sorted(p.name for p in (output / "shards").glob("*.parquet"))
    assert names == sorted(p.name for p in (original / "shards").glob("*.parquet")), "the copy was deleted"
    assert shard_rows(output).equals(shard_rows(original))


def test_a_footer_whose_column_name_no_longer_decodes_is_named_damaged(reference, tmp_path, tiny_clip_dir):
    """A damaged byte in a column name of the footer (invalid UTF-8) is a damaged shard, named, not a
    UnicodeDecodeError; a resuming run with --set-aside-damaged sets it aside."""
    inputs, original = reference
    output = tmp_path / "out"
    shutil.copytree(original, output)
    shard = sorted((output / "shards").glob("*.parquet"))[0]
    video_id = pq.read_table(shard, columns=["video_id"])["video_id"][0].as_py()
    data = shard.read_bytes()
    flip_byte(shard, data.index(b"source_path", len(data) - 8 - int.from_bytes(data[-8:-4], "little")))
    with pytest.raises(DamagedOutputError, match=shard.name):
        TokenReader(str(output)).load(video_id)
    summary = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3,
                               set_aside_damaged=True))
    assert (summary.frames, summary.rows) == (1, 1) and (output / "damaged" / "shards" / shard.name).exists()
    assert TokenReader(str(output)).load(video_id).num_frames == 3


def test_damage_inside_files_is_found_and_set_aside(reference, tmp_path, tiny_clip_dir):
    """A shard damaged in place (same size) is named by the reader; the job checks sizes only, but
    --set-aside-damaged reads every committed shard and finds it. An unreadable (first) index file is
    named; set aside, its shards are adopted again, except one whose settings metadata is damaged."""
    inputs, original = reference
    output = tmp_path / "out"
    shutil.copytree(original, output)
    shards = sorted((output / "shards").glob("*.parquet"))
    flip_byte(shards[2], inside_tokens_page(shards[2]))
    video_id = pq.read_table(original / "shards" / shards[2].name, columns=["video_id"])["video_id"][0].as_py()
    with pytest.raises(DamagedOutputError, match=shards[2].name):
        TokenReader(str(output)).load(video_id)
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3)
    assert run(config).rows == 0, "sizes match: not found without the flag"
    summary = run(dataclasses.replace(config, set_aside_damaged=True))
    assert (summary.frames, summary.rows) == (1, 1) and (output / "damaged" / "shards" / shards[2].name).exists()

    index = sorted((output / "index").glob("*.parquet"))[0]  # the first run's, which names shards[4]
    index.write_bytes(index.read_bytes()[:40])
    table = pq.read_table(shards[4])
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: b'{"schema_version": "3", "mod'}), shards[4])
    with pytest.raises(RunFailed) as failure:
        run(config)
    assert isinstance(failure.value.__cause__, DamagedOutputError) and index.name in str(failure.value.__cause__)
    summary = run(dataclasses.replace(config, set_aside_damaged=True))
    assert (summary.frames, summary.rows) == (1, 1), "the other shards adopted, the damaged one's frame encoded"
    assert sorted(p.name for p in (output / "damaged").rglob("*.parquet")) == sorted(
        [index.name, shards[2].name, shards[4].name])
    reader, want = TokenReader(str(output)), TokenReader(str(original))
    assert sorted(reader.video_ids()) == sorted(want.video_ids())
    for video_id in want.video_ids():
        assert [f.frame_index for f in reader.load(video_id).frames] == [
            f.frame_index for f in want.load(video_id).frames]


def test_readers_opened_while_a_run_merges_its_index_see_every_committed_shard(reference, tmp_path):
    _, original = reference
    output = tmp_path / "out"
    shutil.copytree(original, output)
    [merged] = (output / "index").glob("*.parquet")
    entries = pq.read_table(merged)
    stop = threading.Event()

    def merge_again_and_again():
        fs = pa.fs.LocalFileSystem()
        for i in itertools.count():
            if stop.is_set():
                return
            for name in entries["file"].to_pylist():  # the parts a run writes (each published whole), then merges
                part = entries.filter(pc.equal(entries["file"], name)).replace_schema_metadata(entries.schema.metadata)
                publish(fs, str(output / "index" / name), parquet_bytes(part))
            merge_index_parts(Store(str(output)), f"again-{i}")
            for old in (output / "index").glob("run-again-*.parquet"):
                if old.name != f"run-again-{i}.parquet":
                    old.unlink(missing_ok=True)

    merger = threading.Thread(target=merge_again_and_again)
    merger.start()
    try:
        for _ in range(150):
            assert len(TokenReader(str(output)).files) == 9
    finally:
        stop.set()
        merger.join()


def test_a_damaged_error_file_is_named_by_the_reader(tmp_path):
    """Cut short, or damaged in place (its page CRC fails)."""
    errors = pa.table({"video_id": ["v-0"], "source_path": ["/v.mp4"], "error_type": ["VideoDecodeError"],
                       "error_message": ["cannot open the file as a video"], "frame_indices": [[]],
                       "retryable": [False], "attempt": [1], "sampled_frames": [None]}, schema=ERROR_SCHEMA)
    commit_errors(Store(str(tmp_path)), errors, {})
    (tmp_path / "manifest.json").write_text("{}")
    [path] = (tmp_path / "errors").glob("*.parquet")
    assert TokenReader(str(tmp_path)).errors()["video_id"].to_pylist() == ["v-0"]
    data = bytearray(path.read_bytes())
    data[data.index(b"v-0")] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedOutputError, match=path.name):
        TokenReader(str(tmp_path)).errors()
    path.write_bytes(b"PAR1 not a whole file")
    with pytest.raises(DamagedOutputError, match=path.name):
        TokenReader(str(tmp_path)).errors()


def test_an_uncommitted_shard_with_a_frame_missing_a_view_is_damaged_not_adopted(reference, tmp_path, tiny_clip_dir):
    inputs, original = reference
    output = tmp_path / "out"
    shard = with_an_uncommitted_shard(original, output)
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, table]).replace_schema_metadata(table.schema.metadata), shard)
    with pytest.raises(RunFailed) as failure:
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=3))
    assert isinstance(failure.value.__cause__, DamagedOutputError)
    assert shard.name in str(failure.value.__cause__) and "lack views" in str(failure.value.__cause__)


def test_a_truncated_shard_is_reported_by_name_and_can_be_set_aside(reference, tmp_path, tiny_clip_dir):
    inputs, original = reference
    output = tmp_path / "out"
    shutil.copytree(original, output)
    shard = sorted((output / "shards").glob("*.parquet"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    video_id = pq.read_table(original / "shards" / shard.name, columns=["video_id"])["video_id"][0].as_py()

    with pytest.raises(DamagedOutputError, match=f"{shard.name}: {len(data) // 2} bytes, committed with {len(data)}"):
        TokenReader(str(output)).load(video_id)
    result = job(inputs, output, tiny_clip_dir)
    assert result.returncode == 4, result.stderr[-2000:]
    assert f"shards/{shard.name}: {len(data) // 2} bytes, committed with {len(data)} bytes" in result.stderr
    assert "--set-aside-damaged" in result.stderr
    inspected = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_shards.py"), str(output)],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 4 and shard.name in inspected.stderr, inspected.stderr[-2000:]

    result = job(inputs, output, tiny_clip_dir, "--set-aside-damaged")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (output / "damaged" / "shards" / shard.name).read_bytes() == data[: len(data) // 2]
    assert "frames 1 (1 rows" in result.stdout, "only the set-aside frame is encoded again"
    got, want = shard_rows(output), shard_rows(original)
    assert got.drop_columns(["tokens", "scores", "attempt"]).equals(want.drop_columns(["tokens", "scores", "attempt"]))
    again = got.filter(pc.not_equal(got["attempt"], 1))
    assert again["attempt"].to_pylist() == [2] and again["video_id"].to_pylist() == [video_id], \
        "the set-aside frame, made by the input's second try"
    np.testing.assert_allclose(pc.list_flatten(pc.list_flatten(got["tokens"])).to_numpy().astype(np.float32),
                               pc.list_flatten(pc.list_flatten(want["tokens"])).to_numpy().astype(np.float32),
                               atol=2e-3, rtol=2e-3)
    TokenReader(str(output)).load(video_id)


def test_a_second_job_on_a_held_output_is_refused_and_touches_nothing(tmp_path, tiny_clip_dir):
    inputs = link_inputs(tmp_path / "in", CLIPS[:1])
    output = tmp_path / "out"
    with OutputLease(str(output), "20261129T000000.000Z-abcdef") as held:
        result = job(inputs, output, tiny_clip_dir)
        assert result.returncode == 3, result.stderr[-2000:]
        assert "is being written by another job: run 20261129T000000.000Z-abcdef" in result.stderr
        assert f"pid {os.getpid()}" in result.stderr
        assert sorted(p.name for p in output.iterdir()) == ["lease"]
        assert [p.name for p in (output / "lease").iterdir()] == [Path(held.path).name], "the refused job wrote none"


def write_lease(output: Path, generation: int, run_id: str, host: str, pid: int, age_s: float = 0.0,
                released: bool = False) -> Path:
    path = Path(lease_path(str(output), generation))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "host": host, "pid": pid, "started_at": "2026-11-29T00:00:00Z",
                                "released": released}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_and_released_leases_are_taken_over_and_live_ones_refuse(tmp_path):
    """The holder is the highest lease number: a released one, one whose process died on this host, or one
    whose heartbeat is older than the TTL is taken over with the next number; a live one refuses, and the
    refused job writes nothing."""
    output = tmp_path / "out"
    write_lease(output, 1, "old", "another-host", 1234, age_s=5, released=True)
    killed_here = write_lease(output, 2, "killed-here", socket.gethostname(), dead_pid())
    with OutputLease(str(output), "mine") as lease:
        assert [holder.run_id for holder in lease.taken_over] == ["killed-here"]
        assert [(h.generation, h.run_id) for h in holders(lease.fs, lease.root)] == [(3, "mine")]
        assert not killed_here.exists(), "lower numbers never hold the output again: removed"
    [released] = holders(lease.fs, lease.root)
    assert (released.generation, released.run_id, released.released) == (3, "mine", True)

    write_lease(output, 4, "silent-elsewhere", "another-host", 1234, age_s=3600)
    with OutputLease(str(output), "mine-2") as lease:
        assert [holder.run_id for holder in lease.taken_over] == ["silent-elsewhere"]

    live = write_lease(output, 6, "live-elsewhere", "another-host", 1234, age_s=5)
    with pytest.raises(Exception, match="live-elsewhere .*host another-host, pid 1234.*heartbeat 5 s ago"):
        OutputLease(str(output), "mine").acquire()
    assert sorted(p.name for p in (output / "lease").iterdir()) == ["0000000005.json", live.name], \
        "the refused job left nothing"


def test_two_jobs_starting_at_once_never_both_hold_the_output(tmp_path):
    """Both see the same free number; the file of that number is created only where none exists (O_EXCL):
    exactly one gets it, the other refuses naming it."""
    output = tmp_path / "out"
    first, second = OutputLease(str(output), "first"), OutputLease(str(output), "second")
    original = OutputLease._create
    entered = threading.Barrier(2)

    def create_together(self, generation):
        entered.wait(5)  # both have listed the folder and chosen the same number
        return original(self, generation)

    outcomes = {}

    def take(lease):
        try:
            lease.acquire()
            outcomes[lease.run_id] = "held"
        except Exception as error:  # noqa: BLE001
            outcomes[lease.run_id] = type(error).__name__

    OutputLease._create = create_together
    try:
        threads = [threading.Thread(target=take, args=(lease,)) for lease in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        OutputLease._create = original
    assert sorted(outcomes.values()) == ["OutputLocked", "held"], outcomes
    for lease in (first, second):
        lease.release()


def test_a_takeover_between_a_heartbeat_check_and_its_renewal_leaves_one_holder(tmp_path):
    """The hole of a heartbeat that checks, then re-publishes its lease: a job that took the lease over in
    between had its lease brought back and both jobs' writers passed the check. With numbered leases the
    heartbeat renews its own file in place and never re-creates it; even a lease file brought back by hand
    leaves the old job's fence refusing, because the new job's number is higher."""
    output = tmp_path / "out"
    slow = OutputLease(str(output), "slow", heartbeat_s=0.05)
    slow.acquire()
    slow.fence.check()
    old = Path(slow.path)
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # it stalled past the TTL ...
    taker = OutputLease(str(output), "taker", heartbeat_s=3600)
    taker.acquire()  # ... and another job took the output over between slow's check and its renewal
    assert [h.run_id for h in taker.taken_over] == ["slow"]
    old.write_text(json.dumps({"run_id": "slow", "host": "h", "pid": 1}))  # what the old heartbeat re-published
    with pytest.raises(LeaseLost, match="another job took its lease over"):
        slow.fence.check()
    taker.fence.check()
    store = Store(str(output), slow.fence)
    with pytest.raises(LeaseLost):
        store.publish("shards/late.parquet", b"x")
    assert not (output / "shards" / "late.parquet").exists(), "the fenced writer of the old job writes nothing"
    deadline = time.time() + 10
    while not slow.lost and time.time() < deadline:
        time.sleep(0.05)
    assert slow.lost
    slow.release()
    assert json.loads(old.read_text())["run_id"] == "slow" and not json.loads(old.read_text()).get("released")
    taker.release()


def test_a_lease_deleted_by_hand_and_taken_again_leaves_one_holder(tmp_path):
    """The refusal message says a dead job's lease may be deleted to take the output over now. Deleted while
    that job still lives, the next job gets the same number: the living job's fence then finds another run's
    record under its number and stops it, and neither its heartbeat nor its release touches the new lease."""
    output = tmp_path / "out"
    first = OutputLease(str(output), "first", heartbeat_s=0.05)
    first.acquire()
    os.unlink(first.path)
    second = OutputLease(str(output), "second", heartbeat_s=3600)
    second.acquire()
    assert second.fence.generation == first.fence.generation == 1, "the number is used again"
    with pytest.raises(LeaseLost):
        first.fence.check()
    second.fence.check()
    deadline = time.time() + 10
    while not first.lost and time.time() < deadline:
        time.sleep(0.05)
    first.release()
    [held] = holders(second.fs, second.root)
    assert (held.run_id, held.released) == ("second", False), "the first job did not renew or release it"
    second.release()


def test_a_job_whose_lease_was_taken_over_stops_committing(tmp_path):
    output = tmp_path / "out"
    lease = OutputLease(str(output), "slow", heartbeat_s=0.05)
    lease.acquire()
    Fence(str(output), lease.fence.generation, "slow").check()
    os.unlink(lease.path)  # another job found it stale and took over
    write_lease(output, lease.fence.generation + 1, "taker", "another-host", 1234)
    with pytest.raises(LeaseLost, match="another job took its lease over"):
        lease.fence.check()
    deadline = time.time() + 10
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lease.lost and not os.path.exists(lease.path), "the heartbeat does not bring a taken-over lease back"
    lease.release()


def test_settings_are_checked_again_under_the_lease(tmp_path, tiny_clip_dir, ray_local, monkeypatch):
    """A job with other settings that commits while this one lists its inputs (before it takes the lease) is
    not mixed with it: the check runs again once the lease is held."""
    inputs = link_inputs(tmp_path / "in", CLIPS[:1])
    other, output = tmp_path / "other", tmp_path / "out"
    run(EncodeConfig(input=str(inputs), output=str(other), model=str(tiny_clip_dir), num_frames=1, layer=-3))
    listing = pipeline.run.list_inputs

    def list_while_another_job_commits(*args):
        found = listing(*args)
        shutil.copytree(other, output, ignore=shutil.ignore_patterns("lease"))
        return found

    monkeypatch.setattr(pipeline.run, "list_inputs", list_while_another_job_commits)
    with pytest.raises(RunSetupError, match="layer: existing -3, this run -2"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=1, layer=-2))
    assert TokenReader(str(output)).metadata["layer"] == -3, "only the other job's tokens are there"


def test_revisions_of_a_model_are_not_mixed_in_one_output(tmp_path, tiny_clip_dir, ray_local):
    """Retrained weights in the same folder are another revision (its content fingerprint): refused."""
    inputs = link_inputs(tmp_path / "in", CLIPS[:1])
    model = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model)
    output = tmp_path / "out"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(model), num_frames=1))
    first = TokenReader(str(output)).metadata["model_revision"]
    assert first.startswith("sha256:") and json.loads((output / "manifest.json").read_text())["config"][
        "model_revision"] == first
    weights = CLIPModel.from_pretrained(model)
    with torch.no_grad():
        weights.vision_model.post_layernorm.weight.add_(1.0)
    weights.save_pretrained(model)
    with pytest.raises(RunSetupError, match=rf"model_revision: existing '{first}', this run 'sha256:[0-9a-f]{{64}}'"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(model), num_frames=1))
    with pytest.raises(RunSetupError, match="differs from"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(model), model_revision=first, num_frames=1))


def test_an_object_store_output_round_trips_through_a_local_s3_server(reference, tiny_clip_dir, s3_client):
    inputs, original = reference
    client, credentials, options = s3_client
    client.create_bucket(Bucket="commits")
    uri = f"s3://{credentials}commits/out?{options}"
    summary = run(EncodeConfig(input=str(inputs), output=uri, model=str(tiny_clip_dir), num_frames=3,
                               frames_per_shard=1))
    assert summary.encoded == 3
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket="commits")["Contents"]
                  if not item["Key"].endswith("/"))  # (folder markers)
    assert not [key for key in keys if "/.tmp-" in key], keys
    assert [key for key in keys if key.startswith("out/lease/")] == ["out/lease/0000000001.json"], "released, kept"
    assert len([key for key in keys if key.startswith("out/shards/")]) == 9
    assert len([key for key in keys if key.startswith("out/index/")]) == 1, "parts merged into one index file"
    record = json.loads(client.get_object(Bucket="commits", Key="out/manifest.json")["Body"].read())
    assert record["log"] == f"s3://***@commits/out/logs/{record['run_id']}.log?{options}"

    reader, local = TokenReader(uri), TokenReader(str(original))
    assert sorted(reader.video_ids()) == sorted(local.video_ids())
    for video_id in local.video_ids():
        got, want = reader.load(video_id), local.load(video_id)
        assert [f.frame_index for f in got.frames] == [f.frame_index for f in want.frames]
        for a, b in zip(got.frames, want.frames):
            torch.testing.assert_close(a.tokens.float(), b.tokens.float(), atol=2e-3, rtol=2e-3)

    # a crash between a shard and its index entry, on the store: the next run adopts the shard
    shard = next(key for key in keys if key.startswith("out/shards/"))
    index_key = next(key for key in keys if key.startswith("out/index/"))
    body = client.get_object(Bucket="commits", Key=index_key)["Body"].read()
    table = pq.read_table(pa.BufferReader(body))
    sink = pa.BufferOutputStream()
    pq.write_table(table.filter(pc.not_equal(table["file"], shard.rsplit("/", 1)[1])), sink)
    client.put_object(Bucket="commits", Key=index_key, Body=sink.getvalue().to_pybytes())
    assert len(TokenReader(uri).files) == 8
    again = run(EncodeConfig(input=str(inputs), output=uri, model=str(tiny_clip_dir), num_frames=3))
    assert (again.rows, again.skipped) == (0, 3)
    assert len(TokenReader(uri).files) == 9

    with OutputLease(uri, "20261129T000000.000Z-s3s3s3"):  # one job per output on the store too
        with pytest.raises(OutputBusy, match=r"being written by another job: run 20261129T000000.000Z-s3s3s3") as busy:
            run(EncodeConfig(input=str(inputs), output=uri, model=str(tiny_clip_dir), num_frames=3))
    assert "s3://***@commits/out/lease/0000000003.json?" in str(busy.value)
    assert "test:test" not in str(busy.value)
