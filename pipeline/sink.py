"""Ray Datasink that commits whole frames into Parquet shards, and error rows, atomically and idempotently.

Each write task gets whole encoded blocks. A block row is a frame with all its views
(`pipeline.schema.encoded_schema`), and Ray Data cuts blocks only between rows, so a frame never lands
in two write tasks. The task sorts its frames by key, cuts them into shards of at most ``shard_bytes``
of tokens (never inside a frame), and commits each through the index (`pipeline.commit.commit_shard`);
its error rows go to one error file. File names are a hash of the rows' keys, so a write task that Ray
retries replaces its own files instead of adding duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block
from ray.data.datasource.datasink import WriteResult

from pipeline.commit import commit_errors, commit_shard, incomplete_frames
from pipeline.inputs import filesystem_and_path
from pipeline.lease import check_held
from pipeline.schema import frame_token_counts, shard_schema, split_encoded, views_of


@dataclass
class WriteStats:
    """What one or all write tasks committed (counts, and the ids of the videos touched: per input, not per row)."""

    rows: int = 0
    frames: int = 0
    tokens: int = 0
    error_rows: int = 0
    bytes: int = 0
    files: int = 0
    encoded_videos: set[str] = field(default_factory=set)
    failed_videos: set[str] = field(default_factory=set)

    def add(self, other: "WriteStats") -> None:
        self.rows += other.rows
        self.frames += other.frames
        self.tokens += other.tokens
        self.error_rows += other.error_rows
        self.bytes += other.bytes
        self.files += other.files
        self.encoded_videos |= other.encoded_videos
        self.failed_videos |= other.failed_videos


class ShardSink(Datasink[WriteStats]):
    """Writes ``OUT/shards/*.parquet`` (zstd) with ``OUT/index/`` entries, and ``OUT/errors/*.parquet``,
    all with the run metadata.

    Args:
        output: the output directory or URI.
        run_metadata: what every file records (`pipeline.run.run_metadata`).
        run_id: the run whose lease (`pipeline.lease`) must still be held for a shard to be committed.
        frames_per_shard: most frames per shard file.
        shard_bytes: most token bytes per shard file (a frame larger than that gets a file of its own).
        max_views: most views a frame has (1, or 1 + the most AnyRes tiles).
    """

    def __init__(self, output: str, run_metadata: dict, run_id: str, frames_per_shard: int, shard_bytes: int,
                 max_views: int) -> None:
        self.output = output
        self.run_metadata = run_metadata
        self.run_id = run_id
        self.frames_per_shard = frames_per_shard
        self.shard_bytes = shard_bytes
        self.max_views = max_views
        self.schema = shard_schema(int(run_metadata["hidden_size"]))
        self.stats = WriteStats()

    @property
    def min_rows_per_write(self) -> int:
        """Frames Ray gathers before it calls a write task: ``frames_per_shard``, but no more than fit in
        ``shard_bytes`` at the largest a frame can be (every view with the fixed budget, or every patch,
        plus the extra token), so a write task's memory is bounded whatever the reduction keeps."""
        rows, cols = self.run_metadata["patch_grid"]
        budget = self.run_metadata["method_params"]["budget"]
        tokens_per_view = (budget if budget is not None else rows * cols) + 1
        largest = self.max_views * tokens_per_view * self._bytes_per_token()
        return max(1, min(self.frames_per_shard, self.shard_bytes // largest))

    def _bytes_per_token(self) -> int:
        # fp16 values, int16 position, fp32 score
        return self.schema.field("tokens").type.value_type.list_size * 2 + 2 + 4

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, root = filesystem_and_path(self.output)
        for sub in ("shards", "index", "errors"):
            fs.create_dir(f"{root}/{sub}", recursive=True)

    def write(self, blocks: Iterable[Block], ctx) -> WriteStats:
        tables = [block for block in blocks if block.num_rows]
        stats = WriteStats()
        if not tables:
            return stats
        frames, errors = split_encoded(pa.concat_tables(tables))
        fs, root = filesystem_and_path(self.output)
        anyres = bool(self.run_metadata["preprocessing"]["anyres"])
        frames = frames.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
        for chunk in self._shards(frames):
            shard = views_of(chunk, self.schema)
            problems = incomplete_frames(shard, anyres)
            if problems:  # the encoder emits every view of a frame in its row: a fault of ours
                raise RuntimeError(f"refusing to commit frames without all their views: {problems[:3]}")
            commit = commit_shard(fs, root, shard, self.run_metadata, partial(check_held, fs, root, self.run_id))
            stats.bytes += commit.bytes
            stats.files += 1
            stats.rows += shard.num_rows
            stats.frames += chunk.num_rows
            stats.tokens += int(sum(commit.index["tokens"].to_pylist()))
            stats.encoded_videos.update(commit.index["video_id"].to_pylist())
        if errors.num_rows:
            stats.bytes += commit_errors(fs, root, errors, self.run_metadata)
            stats.files += 1
            stats.error_rows = errors.num_rows
            stats.failed_videos = set(errors["video_id"].to_pylist())
        return stats

    def _shards(self, frames: pa.Table) -> Iterator[pa.Table]:
        """Consecutive runs of ``frames``, each of at most ``frames_per_shard`` frames and ``shard_bytes``
        token bytes (a larger frame alone)."""
        sizes = frame_token_counts(frames) * self._bytes_per_token()
        start, total = 0, 0
        for i, size in enumerate(sizes.tolist()):
            if i > start and (total + size > self.shard_bytes or i - start == self.frames_per_shard):
                yield frames.slice(start, i - start)
                start, total = i, 0
            total += size
        if start < frames.num_rows:
            yield frames.slice(start)

    def on_write_complete(self, write_result: WriteResult[WriteStats]) -> None:
        for stats in write_result.write_returns:
            self.stats.add(stats)

