"""Ray Datasink that commits Parquet shards and error rows atomically and idempotently.

Each write task gets whole encoded blocks (a frame's views always travel in one block), splits them
into token rows and failure rows, and writes each kind to a temporary dot-file that it then renames
into place: a reader never sees a half-written file, and readers that follow the usual convention
(pyarrow, Ray Data, DuckDB, pandas) skip dot-files. File names are a hash of the rows' keys, so a
write task that Ray retries replaces its own file instead of adding a duplicate.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block
from ray.data.datasource.datasink import WriteResult

from pipeline.inputs import filesystem_and_path
from pipeline.runlog import TEMP_PREFIX
from pipeline.schema import file_metadata, split_encoded

# Shard rows are sorted by key and cut into row groups this small, so a reader that wants one video
# reads the few row groups holding it, not the whole file.
ROW_GROUP_ROWS = 64
KEY_COLUMNS = ["video_id", "frame_index", "tile_index"]


@dataclass
class WriteStats:
    """What one or all write tasks committed."""

    rows: int = 0
    tokens: int = 0
    error_rows: int = 0
    bytes: int = 0
    files: int = 0
    frames: set[tuple[str, int]] = field(default_factory=set)
    encoded_videos: set[str] = field(default_factory=set)
    failed_videos: set[str] = field(default_factory=set)

    def add(self, other: "WriteStats") -> None:
        self.rows += other.rows
        self.tokens += other.tokens
        self.error_rows += other.error_rows
        self.bytes += other.bytes
        self.files += other.files
        self.frames |= other.frames
        self.encoded_videos |= other.encoded_videos
        self.failed_videos |= other.failed_videos


class ShardSink(Datasink[WriteStats]):
    """Writes ``OUT/shards/*.parquet`` (zstd) and ``OUT/errors/*.parquet``, both with the run metadata."""

    def __init__(self, output: str, run_metadata: dict, rows_per_shard: int) -> None:
        self.output = output
        self.run_metadata = run_metadata
        self.rows_per_shard = rows_per_shard
        self.stats = WriteStats()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, root = filesystem_and_path(self.output)
        for sub in ("shards", "errors"):
            fs.create_dir(f"{root}/{sub}", recursive=True)

    def write(self, blocks: Iterable[Block], ctx) -> WriteStats:
        tables = [block for block in blocks if block.num_rows]
        stats = WriteStats()
        if not tables:
            return stats
        shard, errors = split_encoded(pa.concat_tables(tables))
        fs, root = filesystem_and_path(self.output)
        if shard.num_rows:
            shard = shard.replace_schema_metadata(file_metadata(self.run_metadata))
            shard = shard.sort_by([(name, "ascending") for name in KEY_COLUMNS])
            stats.bytes += _commit(fs, f"{root}/shards", shard, KEY_COLUMNS)
            stats.files += 1
            stats.rows = shard.num_rows
            stats.tokens = pc.sum(shard["num_tokens"]).as_py()
            stats.frames = set(zip(shard["video_id"].to_pylist(), shard["frame_index"].to_pylist()))
            stats.encoded_videos = set(shard["video_id"].to_pylist())
        if errors.num_rows:
            errors = errors.replace_schema_metadata(file_metadata(self.run_metadata))
            stats.bytes += _commit(fs, f"{root}/errors", errors, ["video_id", "frame_indices"])
            stats.files += 1
            stats.error_rows = errors.num_rows
            stats.failed_videos = set(errors["video_id"].to_pylist())
        return stats

    def on_write_complete(self, write_result: WriteResult[WriteStats]) -> None:
        for stats in write_result.write_returns:
            self.stats.add(stats)


def _commit(fs: pafs.FileSystem, directory: str, table: pa.Table, key_columns: list[str]) -> int:
    """Write ``table`` under a temporary dot-name, then rename it to a name derived from its keys."""
    digest = hashlib.sha1()
    for name in key_columns:
        digest.update(repr(table[name].to_pylist()).encode())
    final = f"{directory}/part-{digest.hexdigest()[:20]}.parquet"
    temporary = f"{directory}/{TEMP_PREFIX}{uuid.uuid4().hex}.parquet"
    pq.write_table(
        table, temporary, filesystem=fs, compression="zstd", row_group_size=ROW_GROUP_ROWS,
        write_statistics=[name for name in KEY_COLUMNS if name in table.column_names],
    )
    fs.move(temporary, final)
    return fs.get_file_info(final).size


def remove_stale_temporaries(output: str) -> int:
    """Delete temporary files a killed run left behind in the output and its shards/, errors/ and runs/
    (only one job may write an output at a time)."""
    fs, root = filesystem_and_path(output)
    removed = 0
    for directory in (root, f"{root}/shards", f"{root}/errors", f"{root}/runs"):
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.base_name.startswith(TEMP_PREFIX):
                fs.delete_file(info.path)
                removed += 1
    return removed
