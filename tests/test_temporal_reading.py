"""Reading a temporal output (HoliTom, `holitom:R`: a row per temporal window) made by the real job with the
tiny CLIP tower: rows cover the sampled frames once, tokens say which frames they stand for, sequences run
over the source frames in HoliTom's order, budgets, the picture and the summary; and an output of schema
version 3 (before windows) read as one frame per row."""

from __future__ import annotations

import json
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

from media import write_h264
from operators.sampling import uniform_indices
from pipeline.config import EncodeConfig
from pipeline.dataset import Budget, TokenDataset, cap_tokens, collate_tokens, select_frames
from pipeline.reader import TokenReader
from pipeline.render import KEPT_OUTLINE, PLOT_HEIGHT, SPANNING_OUTLINE, TEMPORAL_CAPTION
from pipeline.report import summarize
from pipeline.run import run
from pipeline.schema import METADATA_KEY, PROVENANCE_COLUMNS, read_file_metadata, source_info_type
from pipeline.sequence import SequenceLayout, llava_sequence

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 8
SIZE = 336  # the tiny CLIP tower's input: 24x24 patches of 14 px
GRID = 24


def pictures(kind: str) -> list[np.ndarray]:
    """``moving``: four frames of one still background with a white square stepping along the top (one
    window: the background static, the square's patches each frame's own), then four frames of fresh noise (a
    window each). ``still``: eight identical frames (one window of all of them)."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    if kind == "still":
        return [background] * FRAMES
    frames = []
    for i in range(FRAMES):
        if i < 4:
            picture = background.copy()
            picture[:24, 24 * i:24 * (i + 1)] = 255
        else:
            picture = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        frames.append(picture)
    return frames


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_clip_dir, ray_local) -> Path:
    """One run, two methods from one encoder pass: OUT/prumerge (a row per frame) and OUT/holitom-0.25."""
    inputs = tmp_path_factory.mktemp("clips")
    for kind in ("moving", "still"):
        write_h264(inputs / f"{kind}.mp4", pictures(kind), 10, {"g": "8", "crf": "0"})
    output = tmp_path_factory.mktemp("out") / "run"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=FRAMES,
                     method="prumerge,holitom:0.25"))
    return output


def video_id(reader: TokenReader, kind: str) -> str:
    return next(v for v in reader.video_ids() if v.startswith(kind))


def tokens_of(frame) -> list[tuple[int, int, int]]:
    view = frame.global_view
    return list(zip(view.first_frames.tolist(), view.last_frames.tolist(), view.positions.tolist()))


def test_rows_are_windows_covering_each_sampled_frame_once(outputs):
    holitom, per_frame = TokenReader(str(outputs / "holitom-0.25")), TokenReader(str(outputs / "prumerge"))
    assert holitom.metadata["method"] == "holitom" and holitom.metadata["method_params"]["retention"] == 0.25
    assert holitom.metadata["schema_version"] == "5"
    assert sorted(holitom.video_ids()) == sorted(per_frame.video_ids())
    windows = {}
    for vid in holitom.video_ids():
        video, frames = holitom.load(vid), per_frame.load(vid).frames
        assert video.source_info["sampled_frames"] == FRAMES
        # the windows cover exactly the sampled frames, once each, in time order, with their times
        covered = [n for f in video.frames for n in f.frame_indices]
        assert covered == [f.frame_index for f in frames] == list(range(FRAMES))
        assert [t for f in video.frames for t in f.timestamps] == [f.timestamp_s for f in frames]
        for row in video.frames:
            assert (row.frame_index, row.timestamp_s) == (row.frame_indices[0], row.timestamps[0])
            assert row.tiles == () and row.num_tokens > 0
            tokens = tokens_of(row)
            assert all(first in row.frame_indices and last in row.frame_indices and first <= last
                       for first, last, _ in tokens)
            assert [(first, p) for first, _, p in tokens] == sorted((first, p) for first, _, p in tokens)
            static = [(first, last) for first, last, _ in tokens if first < last]
            assert set(static) <= {(row.frame_indices[0], row.frame_indices[-1])}, "a static token spans its window"
        windows[vid.split("-")[0]] = [f.frame_indices for f in video.frames]
        for frame in frames:  # a per-frame method: every token stands for its own frame
            assert tokens_of(frame) == [(frame.frame_index, frame.frame_index, p) for p in frame.positions.tolist()]
    assert windows == {"moving": [(0, 1, 2, 3), (4,), (5,), (6,), (7,)], "still": [tuple(range(FRAMES))]}
    moving = holitom.load(video_id(holitom, "moving"))
    assert any(first < last for first, last, _ in tokens_of(moving.frames[0])), "the background is static"
    assert all(first == last for first, last, _ in tokens_of(moving.frames[1]))

    raw = pads.dataset(outputs / "holitom-0.25" / "shards", format="parquet").to_table()
    assert raw.num_rows == 6 and sorted(map(len, raw["frame_indices"].to_pylist())) == [1, 1, 1, 1, 4, 8]


def test_sequence_runs_over_source_frames_in_holitom_order(outputs):
    reader = TokenReader(str(outputs / "holitom-0.25"))
    for vid in reader.video_ids():
        video = reader.load(vid)
        sequence = llava_sequence(video, SequenceLayout(frame_separator=True))
        assert sequence.frame_index.tolist() == list(range(FRAMES))
        assert sequence.timestamps_s.tolist() == [t for f in video.frames for t in f.timestamps]
        assert len(sequence) == video.num_tokens + FRAMES and sequence.is_separator.sum() == FRAMES
        ends = torch.nonzero(sequence.is_separator).flatten().tolist()
        assert sequence.frame[ends].tolist() == list(range(FRAMES)), "a separator closes every source frame"
        start = 0
        for ordinal, end in enumerate(ends):  # each frame's tokens: by position, placed with their first frame
            assert sequence.frame[start:end].eq(ordinal).all()
            positions = sequence.position[start:end].tolist()
            assert positions == sorted(positions)
            start = end + 1
        real = ~sequence.is_separator
        assert sequence.last_frame[real].ge(sequence.frame[real]).all()
        assert torch.equal(sequence.last_frame[~real], sequence.frame[~real])
        # the tokens are the rows' tokens, each once, with their provenance
        stored = {(int(f), int(l), int(p)): t for row in video.frames
                  for f, l, p, t in zip(row.global_view.first_frames, row.global_view.last_frames, row.positions,
                                        row.tokens)}
        laid = {(int(sequence.frame_index[f]), int(sequence.frame_index[l]), int(p)): t for f, l, p, t in
                zip(sequence.frame[real], sequence.last_frame[real], sequence.position[real], sequence.tokens[real])}
        assert stored.keys() == laid.keys() and all(torch.equal(stored[k], laid[k]) for k in stored)
    still = llava_sequence(reader.load(video_id(reader, "still")), SequenceLayout(frame_separator=True))
    # one window: every token sits with frame 0; frames 1..7 hold only their separators
    assert still.frame[~still.is_separator].eq(0).all() and still.is_separator[-(FRAMES - 1):].all()


def test_budgets_count_source_frames_and_keep_provenance_consistent(outputs):
    reader = TokenReader(str(outputs / "holitom-0.25"))
    per_frame = TokenReader(str(outputs / "prumerge"))
    moving = reader.load(video_id(reader, "moving"))
    kept = uniform_indices(FRAMES, 3).tolist()  # 0, 3, 7: the frames a per-frame output keeps
    three = select_frames(moving, 3)
    assert [f.frame_indices for f in three.frames] == [(0, 3), (7,)]
    assert [f.frame_index for f in select_frames(per_frame.load(video_id(per_frame, "moving")), 3).frames] == kept
    window = moving.frames[0]
    static = [(first, last, p) for first, last, p in tokens_of(window) if first < last]
    expected = ([(0, 3, p) if first < last else (first, last, p) for first, last, p in tokens_of(window)
                 if first in (0, 3)])
    assert tokens_of(three.frames[0]) == expected and len(static) > 0
    assert three.frames[0].timestamps == (window.timestamps[0], window.timestamps[3])

    still = reader.load(video_id(reader, "still"))  # one window of 8 frames: cut, never dropped whole
    two = select_frames(still, 2)
    assert [f.frame_indices for f in two.frames] == [(0, 7)] and two.num_tokens == still.num_tokens

    capped = cap_tokens(moving, 300)
    assert capped.num_tokens == 300
    for row in capped.frames:
        view = row.global_view
        assert len(view.first_frames) == len(view.last_frames) == len(view.positions) == len(view.tokens)
        assert set(view.first_frames.tolist()) <= set(row.frame_indices)
    dataset = TokenDataset(str(outputs / "holitom-0.25"), budget=Budget(max_frames=3, max_tokens=300),
                           layout=SequenceLayout(frame_separator=True))
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_tokens)))
    assert batch["frame_mask"].sum(1).tolist() == [3, 3]  # the still clip's one window cut to frames 0, 3, 7
    real = batch["attention_mask"] & ~batch["is_separator"]
    assert real.sum(1).le(300).all() and batch["last_frame"][real].ge(batch["frame"][real]).all()
    assert batch["last_frame"][~batch["attention_mask"]].eq(-1).all()


def test_the_picture_outlines_static_tokens_on_every_frame_of_their_window(outputs, tmp_path):
    """--panel 336 draws each frame at the tower's own size: the outlines can be read pixel by pixel."""
    out = outputs / "holitom-0.25"
    reader = TokenReader(str(out))
    vid = video_id(reader, "moving")
    png = tmp_path / "moving.png"
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_shards.py"), str(out), "--video", vid,
                             "--png", str(png), "--panel", str(SIZE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "frames 16 in 6 temporal windows (rows)" in result.stdout and "span several frames" in result.stdout
    with Image.open(png) as image:
        assert image.size == (4 * SIZE, 2 * (TEMPORAL_CAPTION + SIZE) + PLOT_HEIGHT)  # 8 source frames, 4 a row
        pixels = np.asarray(image.convert("RGB"))

    def cell(n: int) -> np.ndarray:
        top = (n // 4) * (TEMPORAL_CAPTION + SIZE) + TEMPORAL_CAPTION
        return pixels[top:top + SIZE, (n % 4) * SIZE:(n % 4 + 1) * SIZE]

    def corner(picture: np.ndarray, position: int) -> np.ndarray:  # the top-left pixel of a patch: its outline
        row, col = divmod(position, GRID)
        return picture[14 * row, 14 * col]

    video = reader.load(vid)
    window = video.frames[0]
    tokens = tokens_of(window)
    static = [p for first, last, p in tokens if first < last]
    for number in range(FRAMES):
        picture = cell(number)
        spanning = np.all(picture == SPANNING_OUTLINE, axis=-1).any()
        assert spanning == (number < 4), f"frame {number}: static outlines only on the window's frames"
        if number < 4:
            assert all(np.array_equal(corner(picture, p), SPANNING_OUTLINE) for p in static)
            own = [p for first, last, p in tokens if first == last == number]
            others = {p for first, last, p in tokens if first == last != number} - set(own) - set(static)
            assert all(np.array_equal(corner(picture, p), KEPT_OUTLINE) for p in own)
            assert not any(np.array_equal(corner(picture, p), KEPT_OUTLINE) for p in others)
        else:
            row = video.frames[number - 3]
            assert row.frame_indices == (number,)
            assert all(np.array_equal(corner(picture, p), KEPT_OUTLINE) for p in row.positions.tolist())


def test_summary_counts_windows_and_source_frames(outputs):
    reader = TokenReader(str(outputs / "holitom-0.25"))
    report = summarize(reader)
    videos = [reader.load(v) for v in reader.video_ids()]
    tokens = [t for video in videos for row in video.frames for t in tokens_of(row)]
    assert report.temporal and (report.videos, report.frames, report.rows) == (2, 2 * FRAMES, 6)
    assert sorted(report.window_frames.tolist()) == [1, 1, 1, 1, 4, 8]
    assert report.tokens == len(tokens) and report.tokens_per_frame.sum() == report.tokens
    assert len(report.tokens_per_frame) == len(report.tokens_standing_per_frame) == 2 * FRAMES
    spanning = [(first, last) for first, last, _ in tokens if first < last]
    assert report.spanning_tokens == len(spanning) > 0
    assert report.spanning_frames == sum(last - first + 1 for first, last in spanning)  # frames 0..7, all sampled
    assert report.tokens_standing_per_frame.sum() == report.tokens - len(spanning) + report.spanning_frames
    assert report.kept_fraction == pytest.approx(report.tokens / (2 * FRAMES * GRID * GRID))
    assert report.views_per_frame == 1.0 and report.bytes_per_frame == report.shard_bytes / (2 * FRAMES)
    still = next(v for v in videos if v.video_id.startswith("still"))
    text = "\n".join(report.lines())
    assert "frames 16 in 6 temporal windows (rows)" in text
    assert "windows: 6, 2.67 frames each on average (longest 8); 2 of several frames covering 12 frames" in text
    assert f"tokens per window: mean {report.tokens / 6:.1f}" in text and still.num_tokens > 0

    per_frame = summarize(TokenReader(str(outputs / "prumerge")))
    assert not per_frame.temporal and (per_frame.frames, per_frame.rows) == (2 * FRAMES, 2 * FRAMES)
    assert "temporal windows" not in "\n".join(per_frame.lines())


def as_version(output: Path, copy: Path, version: str) -> Path:
    """``output`` (a per-frame method's, schema version 5) rewritten as ``version`` (3 or 4) wrote it: the shards
    without the columns later versions added (4: what frames a row and a token stand for; 5: the attempt and the
    source's unreadable tail), row groups kept, the index without attempts and with its sizes updated."""
    shutil.copytree(output, copy)
    dropped = ["attempt", *(PROVENANCE_COLUMNS if version == "3" else ())]
    sizes = {}
    for path in (copy / "shards").glob("*.parquet"):
        parquet = pq.ParquetFile(path)
        metadata = read_file_metadata(parquet.schema_arrow)
        metadata["schema_version"] = version
        groups = []
        for g in range(parquet.metadata.num_row_groups):
            group = parquet.read_row_group(g).drop_columns(dropped)
            info = group["source_info"].combine_chunks()
            older = pa.StructArray.from_arrays([info.field(f.name) for f in source_info_type(version)],
                                               fields=list(source_info_type(version)))
            groups.append(group.set_column(group.column_names.index("source_info"), "source_info", older))
        parquet.close()
        schema = groups[0].schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        with pq.ParquetWriter(path, schema, compression="zstd", write_page_checksum=True) as writer:
            for group in groups:
                writer.write_table(group.replace_schema_metadata(schema.metadata))
        sizes[path.name] = path.stat().st_size
    for path in (copy / "index").glob("*.parquet"):
        index = pq.read_table(path).drop_columns(["attempt"])
        metadata = read_file_metadata(index.schema)
        metadata["schema_version"] = version
        column = pa.array([sizes[name] for name in index["file"].to_pylist()], pa.int64())
        index = index.set_column(index.column_names.index("file_bytes"), "file_bytes", column)
        pq.write_table(index.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), path)
    return copy


@pytest.mark.parametrize("version", ["3", "4"])
def test_an_older_output_reads_as_today(outputs, tmp_path, version):
    """Version 3 (one frame per row, no provenance columns) and version 4 (no attempts, no unreadable tail)
    read as today's rows: each row and token stands for its own frame, attempts unknown."""
    today = TokenReader(str(outputs / "prumerge"))
    old = TokenReader(str(as_version(outputs / "prumerge", tmp_path / f"v{version}", version)))
    assert old.metadata["schema_version"] == version
    shard = next((tmp_path / f"v{version}" / "shards").glob("*.parquet"))
    names = set(pq.read_schema(shard).names)
    assert "attempt" not in names and (version == "4") == (set(PROVENANCE_COLUMNS) <= names)
    for vid in today.video_ids():
        new, upgraded = today.load(vid), old.load(vid)
        assert upgraded.source_info["unreadable_tail"] is None
        assert [f.frame_indices for f in upgraded.frames] == [(f.frame_index,) for f in new.frames]
        assert [f.timestamps for f in upgraded.frames] == [f.timestamps for f in new.frames]
        for a, b in zip(new.frames, upgraded.frames):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
            assert torch.equal(a.global_view.first_frames, b.global_view.first_frames)
            assert torch.equal(a.global_view.last_frames, b.global_view.last_frames)
        layout = SequenceLayout(frame_separator=True)
        x, y = llava_sequence(new, layout), llava_sequence(upgraded, layout)
        assert all(torch.equal(getattr(x, name), getattr(y, name)) for name in
                   ("tokens", "frame", "last_frame", "position", "frame_index", "timestamps_s"))
    report = summarize(old)
    assert (report.frames, report.rows, report.tokens) == (2 * FRAMES, 2 * FRAMES, summarize(today).tokens)
