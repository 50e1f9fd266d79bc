"""Ray Datasink that commits whole units into Parquet shards, and error rows, through each method's fenced store.

Each write task gets whole encoded blocks (`pipeline.schema.encoded_schema`). An encoded unit (a frame with
all its views; a temporal segment with all its windows) is one row, and Ray Data cuts blocks only between
rows, so a unit never lands in two write tasks. Per method, the task sorts its units by key, cuts them into
shards of at most ``shard_bytes`` of tokens (never inside a unit), and commits each through the index
(`pipeline.index.commit_shard`); its error rows go to one error file. File names are a hash of the rows'
keys, so a write task that Ray retries replaces its own files instead of adding duplicates. The plan rows
(each input's sampled frames) go back to the driver with the task's counts, for the run's reconciliation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block
from ray.data.datasource.datasink import WriteResult

from pipeline.index import commit_errors, commit_shard
from pipeline.outputs import MethodOutput
from pipeline.schema import kind_masks, shard_schema, split_encoded, unit_rows, unit_token_counts
from pipeline.validate import incomplete_frames


@dataclass
class WriteStats:
    """What one or all write tasks committed for one method (counts, and the ids of the videos touched)."""

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


@dataclass
class WriteReturn:
    """What a write task tells the driver: per method its `WriteStats`, and the plans it saw (video id →
    sampled frames)."""

    stats: list[WriteStats]
    plans: dict[str, list[int]]


class ShardSink(Datasink[WriteReturn]):
    """Writes each method's ``shards/*.parquet`` (zstd) with ``index/`` entries, and ``errors/*.parquet``,
    all with the method's run metadata, into that method's output through its fenced store.

    Args:
        outputs: one per method of the run, in the order of the encoded rows' ``spec``, each with the fence of
            its lease (`pipeline.outputs.MethodOutput`).
        frames_per_shard: most units (frames, or temporal segments) per shard file.
        shard_bytes: most token bytes per shard file (a unit larger than that gets a file of its own).
        max_tokens_per_unit: most tokens a unit can hold over all its rows (sizes a write task's memory).
    """

    def __init__(self, outputs: list[MethodOutput], frames_per_shard: int, shard_bytes: int,
                 max_tokens_per_unit: int) -> None:
        self.outputs = outputs
        self.frames_per_shard = frames_per_shard
        self.shard_bytes = shard_bytes
        self.max_tokens_per_unit = max_tokens_per_unit
        self.schema = shard_schema(int(outputs[0].run_metadata["hidden_size"]))
        self.stats = [WriteStats() for _ in outputs]
        self.plans: dict[str, list[int]] = {}

    @property
    def min_rows_per_write(self) -> int:
        """Rows Ray gathers before it calls a write task: ``frames_per_shard``, but no more than fit in
        ``shard_bytes`` at the largest a unit can be for every method, so a write task's memory is bounded
        whatever the reductions keep."""
        largest = self.max_tokens_per_unit * self._bytes_per_token()
        return max(1, min(self.frames_per_shard, self.shard_bytes // largest))

    def _bytes_per_token(self) -> int:
        # fp16 values, int16 position, fp32 score, two int32 frame numbers
        return self.schema.field("tokens").type.value_type.list_size * 2 + 2 + 4 + 8

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        for target in self.outputs:
            target.store().make_folders("shards", "index", "errors")

    def write(self, blocks: Iterable[Block], ctx) -> WriteReturn:
        tables = [block for block in blocks if block.num_rows]
        result = WriteReturn([WriteStats() for _ in self.outputs], {})
        if not tables:
            return result
        table = pa.concat_tables(tables)
        _, _, plans = kind_masks(table)
        planned = table.filter(plans)
        result.plans = dict(zip(planned["video_id"].to_pylist(), planned["sampled"].to_pylist()))
        for target, (units, errors), stats in zip(self.outputs, split_encoded(table, len(self.outputs)),
                                                  result.stats):
            store = target.store()
            anyres = bool(target.run_metadata["preprocessing"]["anyres"])
            first = pc.list_element(units["frame_index"], 0)
            units = units.append_column("first", first).sort_by([("video_id", "ascending"),
                                                                  ("first", "ascending")]).drop_columns(["first"])
            for chunk in self._shards(units):
                shard = unit_rows(chunk, self.schema)
                problems = incomplete_frames(shard, anyres)
                if problems:  # the encoder emits every view of a frame in its unit: a fault of ours
                    raise RuntimeError(f"refusing to commit frames without all their views: {problems[:3]}")
                commit = commit_shard(store, shard, target.run_metadata)
                stats.bytes += commit.bytes
                stats.files += 1
                stats.rows += shard.num_rows
                stats.frames += int(pc.count_distinct(_frame_keys(shard)).as_py())
                stats.tokens += int(sum(commit.index["tokens"].to_pylist()))
                stats.encoded_videos.update(commit.index["video_id"].to_pylist())
            if errors.num_rows:
                stats.bytes += commit_errors(store, errors, target.run_metadata)
                stats.files += 1
                stats.error_rows = errors.num_rows
                stats.failed_videos = set(errors["video_id"].to_pylist())
        return result

    def _shards(self, units: pa.Table) -> Iterator[pa.Table]:
        """Consecutive runs of ``units``, each of at most ``frames_per_shard`` units and ``shard_bytes``
        token bytes (a larger unit alone)."""
        sizes = unit_token_counts(units) * self._bytes_per_token()
        start, total = 0, 0
        for i, size in enumerate(sizes.tolist()):
            if i > start and (total + size > self.shard_bytes or i - start == self.frames_per_shard):
                yield units.slice(start, i - start)
                start, total = i, 0
            total += size
        if start < units.num_rows:
            yield units.slice(start)

    def on_write_complete(self, write_result: WriteResult[WriteReturn]) -> None:
        for returned in write_result.write_returns:
            for total, part in zip(self.stats, returned.stats):
                total.add(part)
            self.plans.update(returned.plans)


def _frame_keys(shard: pa.Table) -> pa.Array:
    """``video_id`` + frame number of every source frame the shard's rows stand for (a temporal row: several)."""
    parents = pc.list_parent_indices(shard["frame_indices"])
    frames = pc.cast(pc.list_flatten(shard["frame_indices"]), pa.string())
    return pc.binary_join_element_wise(shard["video_id"].take(parents), frames, "\n")
