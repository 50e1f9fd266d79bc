"""The commit index: what makes a shard committed, and how it is read.

An output holds ``shards/`` (token rows), ``index/`` (the commit index), ``errors/`` (error rows),
``runs/`` and ``logs/`` (run records), ``lease/`` (the job that holds it, `pipeline.lease`).

**A shard is committed when the index names it.** A write task publishes a whole shard file, then a
small index file under the same name (``index/part-<hash>.parquet``: one row per video in the shard,
with its row groups, frames, and the shard's size in bytes), both through the run's fenced
`pipeline.store.Store`. A shard without an index entry, left by a crash between the two writes, is not
committed: readers never see it, and the next run that takes the output's lease adopts it
(`pipeline.repair`). At the end of each run the run's index parts are merged into one
``index/run-<run-id>.parquet``, so a reader opens a few small index files instead of every shard's footer.

Error rows are self-contained files (``errors/part-<hash>.parquet``), published the same way; they need no
index.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import file_metadata, read_file_metadata
from pipeline.store import (KEY_COLUMNS, VERIFIED_PARQUET, DamagedOutputError, Store, committed_files, key_name,
                            parquet_bytes, read_verified, read_whole)

LIST_ATTEMPTS = 3  # listings of index/ tried when files listed are gone when read (a merge in between)
INDEX_PART = "part-"  # index/part-*: one shard's entries (named as the shard); index/run-<run id>.parquet: merged
# Shard rows are sorted by key and cut into row groups this small, so a reader that wants one video
# reads the few row groups holding it, not the whole file.
ROW_GROUP_ROWS = 64

INDEX_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("file", pa.string()),  # the shard's name in OUT/shards/
        ("file_bytes", pa.int64()),  # the shard's size: a committed shard of another size is damaged
        ("row_groups", pa.list_(pa.int32())),  # the shard's row groups holding this video's rows
        ("frame_indices", pa.list_(pa.int32())),  # this video's frames in the shard (each with all its views)
        ("rows", pa.int32()),  # shard rows (views, or temporal windows)
        ("tokens", pa.int64()),
        ("sampled_frames", pa.int32()),  # frames the video's sampling selected (source_info.sampled_frames)
        ("attempt", pa.int32()),  # the latest try of the video whose rows are in the shard (null before version 5)
    ]
)


def index_entries(shard: pa.Table, file: str, file_bytes: int, row_group_rows: list[int]) -> pa.Table:
    """The index rows of one shard file (its rows sorted by key, in row groups of ``row_group_rows``
    rows each): one row per video, `INDEX_SCHEMA`."""
    group_of_row = np.repeat(np.arange(len(row_group_rows), dtype=np.int32), row_group_rows)
    ids = shard["video_id"].to_pylist()
    frames = shard["frame_indices"].to_pylist()  # a row of a temporal method stands for a window of frames
    tokens = shard["num_tokens"].to_pylist()
    attempts = shard["attempt"].to_pylist()
    sampled = pc.struct_field(shard["source_info"], "sampled_frames").to_pylist()
    starts = [0, *(i for i in range(1, len(ids)) if ids[i] != ids[i - 1])]
    rows = []
    for start, stop in zip(starts, [*starts[1:], len(ids)]):
        rows.append({
            "video_id": ids[start], "file": file, "file_bytes": file_bytes,
            "row_groups": list(range(group_of_row[start], group_of_row[stop - 1] + 1)),
            "frame_indices": sorted({i for row in frames[start:stop] for i in row}), "rows": stop - start,
            "tokens": sum(tokens[start:stop]), "sampled_frames": sampled[start],
            "attempt": max(attempts[start:stop]),
        })
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def row_group_rows(footer: pq.FileMetaData) -> list[int]:
    """Rows of each row group of a Parquet file."""
    return [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]


@dataclass(frozen=True)
class ShardCommit:
    file: str
    bytes: int
    index: pa.Table


def commit_shard(store: Store, shard: pa.Table, metadata: dict) -> ShardCommit:
    """Publish ``shard`` (rows sorted by key, whole units only) as ``shards/<name>``, then its index
    entries as ``index/<name>``: the second write commits it. Both writes check the store's fence.

    Raises:
        OSError: a file cannot be written.
        pipeline.lease.LeaseLost: this run no longer holds the output.
    """
    name = key_name(shard, KEY_COLUMNS)
    data = parquet_bytes(shard.replace_schema_metadata(file_metadata(metadata)), row_group_size=ROW_GROUP_ROWS)
    store.publish(f"shards/{name}", data)
    entries = index_entries(shard, name, len(data), row_group_rows(pq.read_metadata(pa.BufferReader(data))))
    store.publish(f"index/{name}", parquet_bytes(entries.replace_schema_metadata(file_metadata(metadata))))
    return ShardCommit(name, len(data), entries)


def commit_errors(store: Store, errors: pa.Table, metadata: dict) -> int:
    """Publish error rows (`pipeline.schema.ERROR_SCHEMA`) as ``errors/<name>``; returns its size in bytes."""
    data = parquet_bytes(errors.replace_schema_metadata(file_metadata(metadata)))
    store.publish(f"errors/{key_name(errors, ['video_id', 'frame_indices', 'attempt'])}", data)
    return len(data)


@dataclass
class OutputIndex:
    """The committed shards of an output: ``entries`` (`INDEX_SCHEMA`, one row per shard and video,
    sorted by video and file), the run ``metadata`` its first file records (None: no shard committed)
    and ``metadata_by_file``, one per index file read."""

    entries: pa.Table
    metadata: dict | None
    metadata_by_file: dict[str, dict] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return list(self.metadata_by_file)


def read_index(fs: pafs.FileSystem, root: str, threads: int = 16) -> OutputIndex:
    """Read every index file of the output once, ``threads`` at a time, and drop repeated entries (a
    merge that was interrupted leaves a part beside the run file holding it). Index files of versions
    3-4 have no ``attempt`` (null).

    Raises:
        DamagedOutputError: an index file cannot be read.
    """
    for attempt in range(LIST_ATTEMPTS):
        files = committed_files(fs, root, "index")
        if not files:
            return OutputIndex(INDEX_SCHEMA.empty_table(), None, {})
        with ThreadPoolExecutor(max_workers=threads) as pool:
            tables = list(pool.map(partial(read_whole, fs), files))
        if all(table is not None for table in tables):
            break  # else a file listed was gone when read: a merge (or a set-aside) replaced it; list again
    bad = {path: table or "missing" for path, table in zip(files, tables) if not isinstance(table, pa.Table)}
    if bad:
        raise DamagedOutputError(root, bad)
    entries = pa.concat_tables([_in_index_schema(table) for table in tables])
    keys = pc.binary_join_element_wise(entries["file"], entries["video_id"], "\n")
    if pc.count_distinct(keys).as_py() < entries.num_rows:
        entries = entries.take(_first_occurrences(keys))
    entries = entries.sort_by([("video_id", "ascending"), ("file", "ascending")])
    by_file = {path: read_file_metadata(table.schema) for path, table in zip(files, tables)}
    return OutputIndex(entries, by_file[files[0]], by_file)


def _in_index_schema(table: pa.Table) -> pa.Table:
    columns = [table[name] if name in table.column_names else pa.nulls(table.num_rows, INDEX_SCHEMA.field(name).type)
               for name in INDEX_SCHEMA.names]
    return pa.Table.from_arrays(columns, names=INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def _first_occurrences(keys: pa.Array) -> list[int]:
    seen: dict[str, int] = {}
    for position, key in enumerate(keys.to_pylist()):
        seen.setdefault(key, position)
    return sorted(seen.values())


def merge_index_parts(store: Store, run_id: str) -> int:
    """Merge the ``index/part-*`` files into ``index/run-<run_id>.parquet``, then delete them (a reader
    that lists the folder in between sees entries twice and drops the repeats). Returns parts merged."""
    fs, root = store.fs, store.root
    parts = [path for path in committed_files(fs, root, "index") if os.path.basename(path).startswith(INDEX_PART)]
    if not parts:
        return 0
    with fs.open_input_file(parts[0]) as handle:
        metadata = pq.read_schema(handle).metadata
    merged = pads.dataset(parts, format=VERIFIED_PARQUET, filesystem=fs, schema=INDEX_SCHEMA).to_table()
    merged = merged.sort_by([("video_id", "ascending"), ("file", "ascending")]).replace_schema_metadata(metadata)
    name = f"index/run-{run_id}.parquet"
    if fs.get_file_info(store.path(name)).type == pafs.FileType.File:  # a second merge in the same run
        with fs.open_input_file(store.path(name)) as handle:
            merged = pa.concat_tables([read_verified(handle).read(), merged])
    store.publish(name, parquet_bytes(merged))
    for path in parts:
        store.delete(path)
    return len(parts)
