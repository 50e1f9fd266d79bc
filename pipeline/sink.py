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
import pyarrow.compute as pc
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


@dataclass(frozen=True)
class SinkOutput:
    """Where one method's rows go: its output directory or URI and what its files record
    (`pipeline.run.run_metadata`)."""

    output: str
    run_metadata: dict


class ShardSink(Datasink[list[WriteStats]]):
    """Writes each method's ``shards/*.parquet`` (zstd) with ``index/`` entries, and ``errors/*.parquet``,
    all with the method's run metadata, into that method's output (each method gets the error rows of the
    inputs it still needed).

    Args:
        outputs: one per method of the run, in the order of the encoded rows' ``spec``.
        run_id: the run, which must still hold each output's lease (`pipeline.lease`) for a shard to be
            committed there.
        frames_per_shard: most rows (frames, or temporal windows) per shard file.
        shard_bytes: most token bytes per shard file (a row larger than that gets a file of its own).
        max_views: most views a frame has (1, or 1 + the most AnyRes tiles).
        max_tokens_per_row: most tokens a row can hold over all its views (sizes a write task's memory).
    """

    def __init__(self, outputs: list[SinkOutput], run_id: str, frames_per_shard: int, shard_bytes: int,
                 max_tokens_per_row: int) -> None:
        self.outputs = outputs
        self.run_id = run_id
        self.frames_per_shard = frames_per_shard
        self.shard_bytes = shard_bytes
        self.max_tokens_per_row = max_tokens_per_row
        self.schema = shard_schema(int(outputs[0].run_metadata["hidden_size"]))
        self.stats = [WriteStats() for _ in outputs]

    @property
    def min_rows_per_write(self) -> int:
        """Rows Ray gathers before it calls a write task: ``frames_per_shard``, but no more than fit in
        ``shard_bytes`` at the largest a row can be for every method, so a write task's memory is bounded
        whatever the reductions keep."""
        largest = self.max_tokens_per_row * self._bytes_per_token()
        return max(1, min(self.frames_per_shard, self.shard_bytes // largest))

    def _bytes_per_token(self) -> int:
        # fp16 values, int16 position, fp32 score, two int32 frame numbers
        return self.schema.field("tokens").type.value_type.list_size * 2 + 2 + 4 + 8

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        for target in self.outputs:
            fs, root = filesystem_and_path(target.output)
            for sub in ("shards", "index", "errors"):
                fs.create_dir(f"{root}/{sub}", recursive=True)

    def write(self, blocks: Iterable[Block], ctx) -> list[WriteStats]:
        tables = [block for block in blocks if block.num_rows]
        stats = [WriteStats() for _ in self.outputs]
        if not tables:
            return stats
        split = split_encoded(pa.concat_tables(tables), len(self.outputs))
        for target, (rows, errors), spec_stats in zip(self.outputs, split, stats):
            fs, root = filesystem_and_path(target.output)
            check_lease = partial(check_held, fs, root, self.run_id)
            anyres = bool(target.run_metadata["preprocessing"]["anyres"])
            rows = rows.sort_by([("video_id", "ascending"), ("frame_index", "ascending")])
            for chunk in self._shards(rows):
                shard = views_of(chunk, self.schema)
                problems = incomplete_frames(shard, anyres)
                if problems:  # the encoder emits every view of a frame in its row: a fault of ours
                    raise RuntimeError(f"refusing to commit frames without all their views: {problems[:3]}")
                commit = commit_shard(fs, root, shard, target.run_metadata, check_lease)
                spec_stats.bytes += commit.bytes
                spec_stats.files += 1
                spec_stats.rows += shard.num_rows
                spec_stats.frames += int(pc.sum(pc.list_value_length(chunk["frame_indices"])).as_py())
                spec_stats.tokens += int(sum(commit.index["tokens"].to_pylist()))
                spec_stats.encoded_videos.update(commit.index["video_id"].to_pylist())
            if errors.num_rows:
                spec_stats.bytes += commit_errors(fs, root, errors, target.run_metadata)
                spec_stats.files += 1
                spec_stats.error_rows = errors.num_rows
                spec_stats.failed_videos = set(errors["video_id"].to_pylist())
        return stats

    def _shards(self, rows: pa.Table) -> Iterator[pa.Table]:
        """Consecutive runs of ``rows``, each of at most ``frames_per_shard`` rows and ``shard_bytes``
        token bytes (a larger row alone)."""
        sizes = frame_token_counts(rows) * self._bytes_per_token()
        start, total = 0, 0
        for i, size in enumerate(sizes.tolist()):
            if i > start and (total + size > self.shard_bytes or i - start == self.frames_per_shard):
                yield rows.slice(start, i - start)
                start, total = i, 0
            total += size
        if start < rows.num_rows:
            yield rows.slice(start)

    def on_write_complete(self, write_result: WriteResult[list[WriteStats]]) -> None:
        for stats in write_result.write_returns:
            for total, part in zip(self.stats, stats):
                total.add(part)
