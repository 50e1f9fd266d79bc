"""Reading what the job wrote: round trip, row-group selectivity, refusal of mixed shards, datasets and
loaders, other Parquet readers, Ray Data, the inspect_shards command, and an output whose every input
failed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import EncodeConfig
from pipeline.dataset import Budget, TokenDataset, TokenIterableDataset, collate_tokens
from pipeline.reader import MixedShardsError, ShardFormatError, TokenReader
from pipeline.render import CAPTION, GAP, MIN_WIDTH, PLOT_HEIGHT
from pipeline.report import failure_line, summarize
from pipeline.run import run
from pipeline.schema import METADATA_KEY, file_metadata, read_file_metadata
from pipeline.sequence import SequenceLayout, llava_sequence
from pipeline.index import ROW_GROUP_ROWS, index_entries, row_group_rows
from media import VIDEOS, decode_frame, video

ROOT = Path(__file__).resolve().parents[1]
KEY = [("video_id", "ascending"), ("frame_index", "ascending"), ("tile_index", "ascending")]
NAMES = ["h265_video.mp4", "video_0.mov", "nasa_13013.mp4", "flipping_a_pancake.mkv", "corrupted.mp4"]


@pytest.fixture(scope="module")
def video_output(tmp_path_factory, tiny_clip_dir, ray_local) -> Path:
    """Five real videos (corrupted.mp4 loses 3 of its 6 frames), 3-row shards: most videos are spread over
    several shard files."""
    inputs = tmp_path_factory.mktemp("videos")
    for name in NAMES:
        (inputs / name).symlink_to(VIDEOS / name)
    output = tmp_path_factory.mktemp("out") / "run"
    context = ray_local.data.DataContext.get_current()
    block_size = context.target_max_block_size
    context.target_max_block_size = 1_000_000  # about 3 decoded frames: a video's rows reach several write tasks
    try:
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=6,
                         batch_size=2, frames_per_shard=3))
    finally:
        context.target_max_block_size = block_size
    return output


@pytest.fixture(scope="module")
def image_output(tmp_path_factory, tiny_clip_dir, ray_local) -> Path:
    """Three AnyRes images, 1280x720, 400x720 (padded) and a JPEG named without an extension (listed in a
    text file), all on 2x2 tiles; PruMerge+."""
    inputs = tmp_path_factory.mktemp("images")
    frame = decode_frame(video("bt709_full_range.mp4"))
    Image.fromarray(frame).save(inputs / "wide.jpg", quality=90)
    Image.fromarray(frame[:, :400]).save(inputs / "tall.png")
    Image.fromarray(frame[:, 200:1000]).save(inputs / "photo", format="JPEG", quality=90)
    listing = inputs / "images.txt"
    listing.write_text("".join(f"{inputs / name}\n" for name in ("wide.jpg", "tall.png", "photo")))
    output = tmp_path_factory.mktemp("out") / "images"
    run(EncodeConfig(input=str(listing), output=str(output), model=str(tiny_clip_dir), media="image", anyres=True,
                     method="prumerge+"))
    return output


@pytest.fixture(scope="module")
def failed_output(tmp_path_factory, tiny_clip_dir, ray_local) -> Path:
    """A run whose every input failed (an empty file and a text file named .mp4): error files and a run
    record, no shard."""
    inputs = tmp_path_factory.mktemp("unreadable")
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "notes.mp4").write_text("not a video\n")
    output = tmp_path_factory.mktemp("out") / "failed"
    summary = run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=2))
    assert (summary.inputs, summary.failed, summary.rows) == (2, 2, 0)
    return output


def raw_rows(output: Path) -> pa.Table:
    return pads.dataset(output / "shards", format="parquet").to_table().sort_by(KEY)


def test_round_trip_is_bit_for_bit(video_output):
    reader = TokenReader(str(video_output))
    raw = raw_rows(video_output)
    assert sorted(reader.video_ids()) == sorted(set(raw["video_id"].to_pylist()))
    assert len(reader.video_ids()) == len(NAMES)
    assert any(len({f for f, _ in reader.row_groups(v)}) > 1 for v in reader.video_ids()), "a video spans files"
    assert reader.metadata["method"] == "prumerge" and reader.hidden_size == 32

    for video_id in reader.video_ids():
        want = raw.filter(pa.compute.equal(raw["video_id"], video_id)).to_pylist()
        got = reader.load(video_id)
        assert got.source_path == want[0]["source_path"]
        assert [f.frame_index for f in got.frames] == [r["frame_index"] for r in want]
        assert [f.timestamp_s for f in got.frames] == [r["timestamp_s"] for r in want]
        for frame, row in zip(got.frames, want):
            assert frame.tokens.dtype == torch.float16 and frame.tokens.shape == (row["num_tokens"], 32)
            expected = np.array(row["tokens"], dtype=np.float16).view(np.uint16)
            assert np.array_equal(frame.tokens.numpy().view(np.uint16), expected)
            assert frame.positions.tolist() == row["positions"]
            assert frame.scores.numpy().tobytes() == np.array(row["scores"], dtype=np.float32).tobytes()
            assert frame.tiles == () and (frame.grid_rows, frame.grid_cols) == (1, 1)
    nasa = reader.load(next(v for v in reader.video_ids() if v.startswith("nasa")))
    assert nasa.source_info == {"codec": "h264", "stream_index": 3, "rotation": 0, "width": 480, "height": 270,
                                "num_frames": 390, "fps": pytest.approx(30000 / 1001), "duration_s": pytest.approx(13.013),
                                "time_source": "pts", "sampled_frames": 6, "unreadable_tail": None}
    corrupted = next(v for v in reader.video_ids() if v.startswith("corrupted"))
    assert [f.frame_index for f in reader.load(corrupted).frames] == [0, 9, 19]
    errors = reader.errors()
    assert sorted(errors["frame_indices"].to_pylist()) == [[29, 39, 49]]
    with pytest.raises(KeyError, match="no tokens for video_id"):
        reader.load("missing")


def test_job_writes_sorted_small_row_groups_with_key_statistics(video_output):
    for path in (video_output / "shards").glob("*.parquet"):
        parquet = pq.ParquetFile(path)
        table = parquet.read(columns=["video_id", "frame_index", "tile_index"])
        assert table.equals(table.sort_by(KEY))
        for g in range(parquet.metadata.num_row_groups):
            group = parquet.metadata.row_group(g)
            assert group.num_rows <= ROW_GROUP_ROWS
            assert group.column(0).path_in_schema == "video_id" and group.column(0).statistics.has_min_max


def test_load_reads_only_the_row_groups_of_its_video(video_output, tmp_path):
    """All shards rewritten as one file of 2-row row groups: loading one video reads only its own."""
    out = tmp_path / "regrouped"
    (out / "shards").mkdir(parents=True)
    raw = raw_rows(video_output)
    metadata = pq.read_schema(next((video_output / "shards").glob("*.parquet"))).metadata
    pq.write_table(raw.replace_schema_metadata(metadata), out / "shards" / "all.parquet", row_group_size=2)
    commit_by_hand(out / "shards" / "all.parquet")
    parquet = pq.ParquetFile(out / "shards" / "all.parquet")
    holding = {}
    for g in range(parquet.metadata.num_row_groups):
        for video_id in set(parquet.read_row_group(g, columns=["video_id"])["video_id"].to_pylist()):
            holding.setdefault(video_id, []).append(g)

    original = TokenReader(str(video_output))
    for video_id, groups in holding.items():
        reader = TokenReader(str(out))
        assert [g for _, g in reader.row_groups(video_id)] == groups
        loaded = reader.load(video_id)
        assert reader.row_groups_read == len(groups) < parquet.metadata.num_row_groups
        reference = original.load(video_id)
        assert [torch.equal(a.tokens, b.tokens) for a, b in zip(loaded.frames, reference.frames)] == [True] * len(
            reference.frames)


def commit_by_hand(shard: Path) -> None:
    """Write the index entries of a shard file made by hand (`pipeline.index`'s format), committing it."""
    parquet = pq.ParquetFile(shard)
    table = parquet.read()
    entries = index_entries(table, shard.name, shard.stat().st_size, row_group_rows(parquet.metadata))
    (shard.parent.parent / "index").mkdir(exist_ok=True)
    pq.write_table(entries.replace_schema_metadata(table.schema.metadata),
                   shard.parent.parent / "index" / shard.name)


def rewrite_metadata(path: Path, **changes) -> None:
    table = pq.read_table(path)
    metadata = read_file_metadata(table.schema)
    metadata.update(changes)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), path)


def test_mixed_models_or_methods_and_unknown_versions_are_refused(video_output, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(video_output, mixed)
    [index] = (mixed / "index").glob("*.parquet")  # a completed run merged its index into one file
    other = index.with_name("run-other.parquet")
    shutil.copy(index, other)
    rewrite_metadata(other, method="prumerge+")
    with pytest.raises(MixedShardsError, match="different settings") as error:
        TokenReader(str(mixed))
    assert "'prumerge+'" in str(error.value) and "'prumerge'" in str(error.value)
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_shards.py"), str(mixed)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "different settings" in result.stderr

    other.unlink()  # the index and a shard disagree: found when the shard is opened
    shard = next((mixed / "shards").glob("*.parquet"))
    rewrite_metadata(shard, layer=-3)
    entries = pq.read_table(index)
    sizes = [shard.stat().st_size if name == shard.name else size
             for name, size in zip(entries["file"].to_pylist(), entries["file_bytes"].to_pylist())]
    pq.write_table(entries.set_column(entries.column_names.index("file_bytes"), "file_bytes",
                                      pa.array(sizes, pa.int64())), index)
    reader = TokenReader(str(mixed))
    video_id = pq.read_table(shard, columns=["video_id"])["video_id"][0].as_py()
    with pytest.raises(MixedShardsError, match=r"made with other settings \(layer\) than its index records"):
        reader.load(video_id)

    rewrite_metadata(index, schema_version="99")
    with pytest.raises(ShardFormatError, match="schema version '99'"):
        TokenReader(str(mixed))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nothing'} does not exist")):
        TokenReader(str(tmp_path / "nothing"))
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty holds no shard .*, error file .* or run record"):
        TokenReader(str(tmp_path / "empty"))
    assert file_metadata({})  # the writer's metadata round-trips through the reader's parser
    assert read_file_metadata(pa.schema([], metadata=file_metadata({"model": "m"})))["model"] == "m"


def test_map_style_dataset_and_loader(video_output):
    dataset = TokenDataset(str(video_output), budget=Budget(max_frames=4, max_tokens=60),
                           layout=SequenceLayout(frame_separator=True))
    reader = TokenReader(str(video_output))
    assert len(dataset) == len(reader.video_ids())
    seen = []
    for batch in DataLoader(dataset, batch_size=2, collate_fn=collate_tokens):
        assert batch["tokens"].shape[:2] == batch["attention_mask"].shape
        real = batch["attention_mask"] & ~batch["is_separator"]
        assert real.sum(1).le(60).all() and batch["frame_mask"].sum(1).le(4).all()
        for row, video_id in enumerate(batch["video_id"]):
            expected = llava_sequence(Budget(4, 60).apply(reader.load(video_id)), SequenceLayout(frame_separator=True))
            length = batch["lengths"][row]
            assert torch.equal(batch["tokens"][row, :length], expected.tokens)
            assert batch["is_separator"][row, :length].sum() == len(expected.frame_index)
        seen += batch["video_id"]
    assert sorted(seen) == sorted(reader.video_ids())


ENCODING_STACK = ("decord", "av", "ray", "transformers", "PIL", "einops")
WITHOUT_ENCODING_STACK = """
import sys

class Unavailable:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")

sys.meta_path.insert(0, Unavailable())
sys.path.insert(0, {root!r})
import torch
from torch.utils.data import DataLoader
from pipeline.dataset import Budget, TokenDataset, collate_tokens
from pipeline.reader import TokenReader
from pipeline.sequence import SequenceLayout, llava_sequence

dataset = TokenDataset({output!r}, budget=Budget(max_frames=2), layout=SequenceLayout(frame_separator=True))
batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_tokens)))
print(len(dataset), int(batch["attention_mask"].sum()), int(batch["frame_mask"].sum()))
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in {blocked!r})
assert not loaded, loaded
"""


def test_training_side_reads_without_the_decoding_and_encoding_stack(video_output):
    """Training nodes (often aarch64, where decord has no wheels) read shards with torch, numpy and pyarrow
    alone: the reader, sequences and datasets import and load a real output with decord, PyAV, Ray,
    transformers, Pillow and einops unimportable."""
    script = WITHOUT_ENCODING_STACK.format(blocked=ENCODING_STACK, root=str(ROOT), output=str(video_output))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]

    dataset = TokenDataset(str(video_output), budget=Budget(max_frames=2), layout=SequenceLayout(frame_separator=True))
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_tokens)))
    expected = f"{len(dataset)} {int(batch['attention_mask'].sum())} {int(batch['frame_mask'].sum())}"
    assert result.stdout.split() == expected.split()

    blocked = subprocess.run([sys.executable, "-c", script.replace("from pipeline.sequence", "import decord\nfrom pipeline.sequence")],
                             capture_output=True, text=True, timeout=120, cwd="/")
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr, "the block itself must work"


def test_iterable_dataset_splits_over_workers_and_ranks(video_output):
    ids = sorted(TokenReader(str(video_output)).video_ids())
    streamed = TokenIterableDataset(str(video_output))
    loader = DataLoader(streamed, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert sorted(sample["video_id"] for sample in loader) == ids  # every video exactly once

    ranks = [TokenIterableDataset(str(video_output), rank=r, world_size=2).worker_videos() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ids) // 2 and not set(ranks[0]) & set(ranks[1])

    shuffled = TokenIterableDataset(str(video_output), shuffle=True, seed=3)
    orders = []
    for epoch in range(4):
        shuffled.set_epoch(epoch)
        orders.append(shuffled.epoch_order())
    assert all(sorted(order) == ids for order in orders) and len({tuple(o) for o in orders}) > 1
    shuffled.set_epoch(0)
    assert shuffled.epoch_order() == orders[0], "same seed and epoch, same order"


def test_anyres_image_reassembles_tiles(image_output):
    reader = TokenReader(str(image_output))
    grid_rows, grid_cols = reader.metadata["patch_grid"]
    stitched_rows_seen = 0
    for video_id in reader.video_ids():
        image = reader.load(video_id)
        (frame,) = image.frames
        assert (frame.grid_rows, frame.grid_cols) == (2, 2) and len(frame.tiles) == 4
        assert [t.tile_index for t in frame.tiles] == [0, 1, 2, 3]
        sequence = llava_sequence(image)
        real = ~sequence.is_separator
        assert int(real.sum()) == image.num_tokens
        assert sequence.tile[: frame.global_view.num_tokens].eq(-1).all(), "global view first"
        pairs = sorted(zip(sequence.tile[real].tolist(), sequence.position[real].tolist()))
        assert pairs == sorted((v.tile_index, p) for v in frame.views for p in v.positions.tolist())
        # After the global view: stitched rows, each closed by a newline, rows going down the image;
        # then the tiles' merged extra tokens.
        rest = slice(frame.global_view.num_tokens, len(sequence))
        tiles, position = sequence.tile[rest].numpy(), sequence.position[rest].numpy().astype(int)
        separator = sequence.is_separator[rest].numpy()
        last = int(np.flatnonzero(separator)[-1]) if separator.any() else -1  # tiles may keep no patch token
        assert np.all(position[last + 1 :] == -1) and tiles[last + 1 :].tolist() == [0, 1, 2, 3]
        stitched_row = (tiles // 2) * grid_rows + position // grid_cols
        rows = [set(stitched_row[a + 1 : b]) for a, b in zip([-1, *np.flatnonzero(separator)], np.flatnonzero(separator))]
        assert all(len(r) == 1 for r in rows), "one stitched row between newlines"
        assert [r.pop() for r in rows] == sorted(set(stitched_row[: last + 1][~separator[: last + 1]]))
        stitched_rows_seen += len(rows)
    assert stitched_rows_seen > 0


def test_other_parquet_readers_open_the_shards(video_output):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    raw = raw_rows(video_output)
    first = raw.slice(0, 1).to_pylist()[0]
    want = np.array(first["tokens"], dtype=np.float32)
    files = sorted(str(p) for p in (video_output / "shards").glob("*.parquet"))

    frame = pd.read_parquet(video_output / "shards")
    assert len(frame) == raw.num_rows
    row = frame[(frame.video_id == first["video_id"]) & (frame.frame_index == first["frame_index"])].iloc[0]
    assert np.array_equal(np.stack(row["tokens"]).astype(np.float32), want)

    polars = pl.read_parquet(files)
    assert polars.height == raw.num_rows
    row = polars.filter((pl.col("video_id") == first["video_id"]) & (pl.col("frame_index") == first["frame_index"]))
    assert np.array_equal(np.array(row["tokens"][0].to_list(), dtype=np.float32), want)

    glob = str(video_output / "shards" / "*.parquet")
    (count,), = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()
    assert count == raw.num_rows
    (tokens,), = duckdb.sql(
        f"SELECT tokens FROM read_parquet('{glob}') WHERE video_id = '{first['video_id']}' "
        f"AND frame_index = {first['frame_index']}"
    ).fetchall()
    assert np.array_equal(np.array(tokens, dtype=np.float32), want)

    hf = datasets.Dataset.from_parquet(files, cache_dir=str(video_output.parent / "hf-cache"))
    assert hf.num_rows == raw.num_rows
    match = hf.filter(lambda r: r["video_id"] == first["video_id"] and r["frame_index"] == first["frame_index"])
    assert np.array_equal(np.array(match[0]["tokens"], dtype=np.float32), want)


def test_ray_data_rows_can_be_mapped(video_output, ray_local):
    def mean_token(batch: pa.Table) -> pa.Table:  # the README's example
        means = [np.array(tokens, dtype=np.float32).mean() for tokens in batch["tokens"].to_pylist()]
        return pa.table({"video_id": batch["video_id"], "frame_index": batch["frame_index"], "mean": means})

    rows = ray_local.data.read_parquet(str(video_output / "shards")).map_batches(mean_token, batch_format="pyarrow")
    got = {(r["video_id"], r["frame_index"]): r["mean"] for r in rows.take_all()}
    reader = TokenReader(str(video_output))
    for video_id in reader.video_ids():
        for frame in reader.load(video_id).frames:
            assert got[(video_id, frame.frame_index)] == pytest.approx(frame.tokens.float().mean().item(), rel=1e-5)


def test_report_counts_match_the_shards(video_output):
    report = summarize(TokenReader(str(video_output)))
    raw = raw_rows(video_output)
    assert (report.videos, report.frames, report.rows) == (len(NAMES), raw.num_rows, raw.num_rows)
    assert report.tokens == sum(raw["num_tokens"].to_pylist())
    assert sorted(report.tokens_per_frame.tolist()) == sorted(raw["num_tokens"].to_pylist())
    assert (report.failed_inputs, report.partly_failed_videos, report.error_rows) == (0, 1, 1)
    (failure,) = report.failures
    assert failure_line(failure).startswith(f"{failure['source_path']}: {failure['error_type']}: ")
    assert failure_line(failure).endswith(" (frames 29, 39, 49)") and failure["source_path"].endswith("corrupted.mp4")
    assert report.patches_per_view == 576 and report.full_fp16_bytes_per_frame == 576 * 32 * 2
    assert sum(n for _, _, n in report.histogram()) == report.frames
    assert 0 < report.kept_fraction < 1


def inspect(output: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_shards.py"), str(output), *args],
                          capture_output=True, text=True, timeout=300)


def test_inspect_shards_prints_a_summary_and_draws_videos(video_output, tmp_path):
    video_id = next(v for v in TokenReader(str(video_output)).video_ids() if v.startswith("nasa"))
    png = tmp_path / "nasa.png"
    result = inspect(video_output, "--video", video_id, "--png", str(png), "--max-frames", "5", "--panel", "96")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "videos 5" in result.stdout and "tokens per frame histogram" in result.stdout
    assert "kept" in result.stdout and "bytes per frame" in result.stdout
    assert "failures:\n  " in result.stdout and "corrupted.mp4: " in result.stdout
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        # 5 frames: 4 columns x 2 rows of 96 px panels under captions, then the plot, at least MIN_WIDTH wide
        assert image.format == "PNG" and image.size == (max(MIN_WIDTH, 4 * 96), 2 * (CAPTION + 96) + PLOT_HEIGHT)
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50, "the frames are drawn, not a blank canvas"

    assert inspect(video_output, "--video", "nope", "--png", str(png)).returncode == 2


def test_inspect_shards_draws_anyres_tiles(image_output, tmp_path):
    """The media kind comes from the run's metadata: an image named without an extension is drawn as one."""
    png = tmp_path / "image.png"
    photo = next(v for v in TokenReader(str(image_output)).video_ids() if v.startswith("photo"))
    result = inspect(image_output, "--video", photo, "--png", str(png), "--panel", "200")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(png) as image:  # one frame: global view, gap, 2x2 stitched tiles (square)
        assert image.size == (max(MIN_WIDTH, 200 + GAP + 200), CAPTION + 200 + PLOT_HEIGHT)


def inspect_in_process(monkeypatch, *argv: str) -> int:
    """``jobs/inspect_shards.py``'s ``main`` with ``argv``, run in this process."""
    spec = importlib.util.spec_from_file_location("inspect_shards", ROOT / "jobs" / "inspect_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["inspect_shards.py", *argv])
    return module.main()


def test_an_output_whose_every_input_failed_opens_with_its_errors(failed_output, tmp_path):
    assert not list(failed_output.glob("shards/*.parquet")) and list(failed_output.glob("errors/*.parquet"))
    reader = TokenReader(str(failed_output))
    assert (len(reader), reader.video_ids(), reader.files) == (0, [], [])
    assert reader.metadata is None and reader.hidden_size is None
    errors = sorted(reader.errors().to_pylist(), key=lambda row: row["source_path"])
    assert [Path(row["source_path"]).name for row in errors] == ["empty.mp4", "notes.mp4"]
    for row in errors:
        assert row["error_type"] == "VideoDecodeError" and row["frame_indices"] == []
        assert row["error_message"].startswith("cannot open the file as a video")
        assert row["video_id"] not in reader
        with pytest.raises(KeyError, match=r"see \.errors\(\)"):
            reader.load(row["video_id"])

    assert len(TokenDataset(str(failed_output))) == 0
    assert list(DataLoader(TokenIterableDataset(str(failed_output)), batch_size=None)) == []

    report = summarize(reader)
    assert (report.model, report.videos, report.frames, report.tokens) == (None, 0, 0, 0)
    assert (report.failed_inputs, report.partly_failed_videos, report.error_rows) == (2, 0, 2)
    assert report.errors_by_type == {"VideoDecodeError": 2}

    # The error files alone are an output, and so is a run record alone (a run that committed nothing).
    shutil.copytree(failed_output / "errors", tmp_path / "errors-only" / "errors")
    assert TokenReader(str(tmp_path / "errors-only")).errors().num_rows == 2
    (tmp_path / "record-only").mkdir()
    shutil.copy(failed_output / "manifest.json", tmp_path / "record-only")
    record_only = TokenReader(str(tmp_path / "record-only"))
    assert (len(record_only), record_only.errors().num_rows) == (0, 0)


def test_inspect_shards_lists_the_failures_of_an_output_without_shards(failed_output, tmp_path, monkeypatch, capsys):
    result = inspect(failed_output)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no shards: no input produced tokens" in result.stdout and "failed inputs 2" in result.stdout
    for row in TokenReader(str(failed_output)).errors().to_pylist():
        line = failure_line(row)
        assert line.startswith(f"{row['source_path']}: VideoDecodeError: cannot open the file as a video")
        assert f"  {line}\n" in result.stdout

    png = tmp_path / "kept.png"
    assert inspect_in_process(monkeypatch, str(failed_output), "--png", str(png)) == 2
    out, err = capsys.readouterr()
    assert "failed inputs 2" in out and "no video to draw" in err and not png.exists()
