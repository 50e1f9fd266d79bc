"""How an output's files are committed, and what counts as committed.

An output holds ``shards/`` (token rows), ``index/`` (the commit index), ``errors/`` (error rows),
``runs/`` and ``logs/`` (run records), ``lease/`` (the job that holds it, `pipeline.lease`).

**A shard is committed when the index names it.** A write task writes a whole shard file, then a
small index file under the same name (``index/part-<hash>.parquet``: one row per video in the shard,
with its row groups, frame indices, and the shard's size in bytes). Each file is published whole
(`publish`): on a local disk it is written under a temporary dot-name, ``fsync``-ed and renamed, so a
crash cannot leave a truncated file under a committed name; on an object store a single upload is
atomic by itself (S3 makes an object visible only when its upload completes) and no rename (a copy of
every byte there) is needed. Every page carries a CRC, checked whenever a file is read. A shard
without an index entry, left by a crash between the two writes, is not committed: readers never see
it, and the next run that takes the output's lease adopts it (`prepare_output`) after checking that it
reads back whole and that none of its frames is committed already. At the end of each run the run's
index parts are merged into one ``index/run-<run-id>.parquet``, so a reader opens a few small index
files instead of every shard's footer.

Error rows are self-contained files, published the same way; they need no index.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.inputs import filesystem_and_path, is_local, redact_credentials
from pipeline.schema import (ERROR_SCHEMA, SCHEMA_VERSION, differing_settings, expected_tiles, file_metadata,
                             read_file_metadata, shard_schema)

TEMP_PREFIX = ".tmp-"  # files being written; a killed run's leftovers are removed by the next lease holder
LIST_ATTEMPTS = 3  # listings of index/ tried when files listed are gone when read (a merge in between)
INDEX_PART = "part-"  # index/part-*: one shard's entries (named as the shard); index/run-<run id>.parquet: merged
DAMAGED = "damaged"  # OUT/damaged/<sub>/<name>: files set aside by --set-aside-damaged
# Shard rows are sorted by key and cut into row groups this small, so a reader that wants one video
# reads the few row groups holding it, not the whole file.
ROW_GROUP_ROWS = 64
KEY_COLUMNS = ["video_id", "frame_index", "tile_index"]

INDEX_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("file", pa.string()),  # the shard's name in OUT/shards/
        ("file_bytes", pa.int64()),  # the shard's size: a committed shard of another size is damaged
        ("row_groups", pa.list_(pa.int32())),  # the shard's row groups holding this video's rows
        ("frame_indices", pa.list_(pa.int32())),  # this video's frames in the shard (each with all its views)
        ("rows", pa.int32()),  # views
        ("tokens", pa.int64()),
        ("sampled_frames", pa.int32()),  # frames the video's sampling selected (source_info.sampled_frames)
    ]
)

logger = logging.getLogger(__name__)


class DamagedOutputError(Exception):
    """Committed files of the output cannot be read back whole: ``damaged`` maps each to what is wrong."""

    def __init__(self, output: str, damaged: dict[str, str]) -> None:
        lines = [f"{path}: {reason}" for path, reason in sorted(damaged.items())]
        listed = "".join(f"\n  {line}" for line in lines[:20])
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        where = redact_credentials(output)
        super().__init__(f"{where} has {len(lines)} damaged file(s):{listed}{more}\nRun again with "
                         f"--set-aside-damaged to move them to {DAMAGED}/ and encode their frames again.")
        self.damaged = damaged


# -- publishing one file ---------------------------------------------------------------------------


def publish(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Make ``data`` the content of ``path`` at once: readers see the old file or the whole new one.

    Local: written to a temporary dot-file beside it (the folder made if missing), ``fsync``-ed, renamed,
    and the folder ``fsync``-ed, so after a node crash the name holds either nothing or every byte.
    Object store: one upload, which the store makes visible only once complete.

    Raises:
        OSError: the file cannot be written.
    """
    if not is_local(fs):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}-{os.path.basename(path)}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def parquet_bytes(table: pa.Table, **options) -> bytes:
    """``table`` as a Parquet file (zstd, key statistics, a CRC per page so damage inside a file is
    found when it is read: `read_verified`), in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True,
                   write_statistics=[name for name in KEY_COLUMNS if name in table.column_names], **options)
    return sink.getvalue()


def key_name(table: pa.Table, key_columns: list[str]) -> str:
    """``part-<hash of the rows' keys>.parquet``: a write that Ray retries replaces its own file."""
    digest = hashlib.sha1()
    for name in key_columns:
        digest.update(repr(table[name].to_pylist()).encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"


def committed_files(fs: pafs.FileSystem, root: str, sub: str) -> list[str]:
    """The complete Parquet files of ``<root>/<sub>`` (``shards``, ``index`` or ``errors``), sorted;
    temporary dot-files are not listed, and a missing folder lists nothing. (For ``shards`` this is
    what is on disk, committed or not; the index says which are committed.)"""
    directory = f"{root}/{sub}"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory))
    return sorted(i.path for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith("."))


def method_folders(fs: pafs.FileSystem, root: str) -> list[str]:
    """The sub-folders of ``root`` holding a run record (``manifest.json``), sorted: one output per method
    of a run with several (`--method a,b`). A missing ``root`` has none."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(root))
                  if info.type == pafs.FileType.Directory
                  and fs.get_file_info(f"{info.path}/manifest.json").type == pafs.FileType.File)


# -- shards and their index entries ----------------------------------------------------------------


def incomplete_frames(shard: pa.Table, anyres: bool) -> list[str]:
    """Frames of ``shard`` (rows sorted by key) whose views are not exactly the global view and, when
    ``anyres``, every tile of their grid (`pipeline.schema.expected_tiles`); one line each."""
    keys = zip(*(shard[name].to_pylist() for name in ("video_id", "frame_index", "tile_index", "grid_rows",
                                                       "grid_cols")))
    frames: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for video_id, frame_index, tile, rows, cols in keys:
        tiles, want = frames.setdefault((video_id, frame_index), ([], expected_tiles(rows, cols, anyres)))
        tiles.append(tile)
    return [f"{video_id} frame {frame_index}: views {tiles}, expected {want}"
            for (video_id, frame_index), (tiles, want) in frames.items() if tiles != want]


def index_entries(shard: pa.Table, file: str, file_bytes: int, row_group_rows: list[int]) -> pa.Table:
    """The index rows of one shard file (its rows sorted by key, in row groups of ``row_group_rows``
    rows each): one row per video, `INDEX_SCHEMA`."""
    group_of_row = np.repeat(np.arange(len(row_group_rows), dtype=np.int32), row_group_rows)
    ids = shard["video_id"].to_pylist()
    frames = shard["frame_indices"].to_pylist()  # a row of a temporal method stands for a window of frames
    tokens = shard["num_tokens"].to_pylist()
    sampled = pc.struct_field(shard["source_info"], "sampled_frames").to_pylist()
    starts = [0, *(i for i in range(1, len(ids)) if ids[i] != ids[i - 1])]
    rows = []
    for start, stop in zip(starts, [*starts[1:], len(ids)]):
        rows.append({
            "video_id": ids[start], "file": file, "file_bytes": file_bytes,
            "row_groups": list(range(group_of_row[start], group_of_row[stop - 1] + 1)),
            "frame_indices": sorted({i for row in frames[start:stop] for i in row}), "rows": stop - start,
            "tokens": sum(tokens[start:stop]), "sampled_frames": sampled[start],
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


def commit_shard(fs: pafs.FileSystem, root: str, shard: pa.Table, metadata: dict, check_lease=None) -> ShardCommit:
    """Publish ``shard`` (rows sorted by key, whole frames only) as ``shards/<name>``, then its index
    entries as ``index/<name>``: the second write commits it. ``check_lease()``, called between
    the two, raises when this job no longer holds the output (another job took the lease over).

    Raises:
        OSError: a file cannot be written.
        pipeline.lease.LeaseLost: from ``check_lease``.
    """
    name = key_name(shard, KEY_COLUMNS)
    data = parquet_bytes(shard.replace_schema_metadata(file_metadata(metadata)), row_group_size=ROW_GROUP_ROWS)
    publish(fs, f"{root}/shards/{name}", data)
    entries = index_entries(shard, name, len(data), row_group_rows(pq.read_metadata(pa.BufferReader(data))))
    if check_lease is not None:
        check_lease()
    publish(fs, f"{root}/index/{name}", parquet_bytes(entries.replace_schema_metadata(file_metadata(metadata))))
    return ShardCommit(name, len(data), entries)


def commit_errors(fs: pafs.FileSystem, root: str, errors: pa.Table, metadata: dict) -> int:
    """Publish error rows (`ERROR_SCHEMA`) as ``errors/<name>``; returns its size in bytes."""
    data = parquet_bytes(errors.replace_schema_metadata(file_metadata(metadata)))
    publish(fs, f"{root}/errors/{key_name(errors, ['video_id', 'frame_indices'])}", data)
    return len(data)


# -- reading the index -----------------------------------------------------------------------------


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
    merge that was interrupted leaves a part beside the run file holding it).

    Raises:
        DamagedOutputError: an index file cannot be read.
    """
    for attempt in range(LIST_ATTEMPTS):
        files = committed_files(fs, root, "index")
        if not files:
            return OutputIndex(INDEX_SCHEMA.empty_table(), None, {})
        with ThreadPoolExecutor(max_workers=threads) as pool:
            tables = list(pool.map(partial(_read_whole, fs), files))
        if all(table is not None for table in tables):
            break  # else a file listed was gone when read: a merge (or a set-aside) replaced it; list again
    bad = {path: table or "missing" for path, table in zip(files, tables) if not isinstance(table, pa.Table)}
    if bad:
        raise DamagedOutputError(root, bad)
    entries = pa.concat_tables([table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA) for table in tables])
    keys = pc.binary_join_element_wise(entries["file"], entries["video_id"], "\n")
    if pc.count_distinct(keys).as_py() < entries.num_rows:
        entries = entries.take(_first_occurrences(keys))
    entries = entries.sort_by([("video_id", "ascending"), ("file", "ascending")])
    by_file = {path: read_file_metadata(table.schema) for path, table in zip(files, tables)}
    return OutputIndex(entries, by_file[files[0]], by_file)


# What reading a damaged Parquet file raises: I/O and Arrow errors, and a UnicodeDecodeError (a ValueError) when
# a column name in its footer no longer decodes.
UNREADABLE = (OSError, ValueError, pa.ArrowException)

# Datasets of the output's files read with each page checked against its CRC (see `read_verified`).
VERIFIED_PARQUET = pads.ParquetFileFormat(
    default_fragment_scan_options=pads.ParquetFragmentScanOptions(page_checksum_verification=True))


def read_verified(handle: pa.NativeFile, **options) -> pq.ParquetFile:
    """A Parquet file whose pages are checked against their CRCs as they are read (files written
    before page CRCs have none to check)."""
    return pq.ParquetFile(handle, page_checksum_verification=True, **options)


def _read_whole(fs: pafs.FileSystem, path: str) -> pa.Table | str | None:
    """The Parquet table at ``path``; None when it is gone; else why it cannot be read (its first line)."""
    try:
        with fs.open_input_file(path) as handle:
            return read_verified(handle).read()
    except FileNotFoundError:
        return None
    except UNREADABLE as error:
        return _first_line(error)


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


def _first_occurrences(keys: pa.Array) -> list[int]:
    seen: dict[str, int] = {}
    for position, key in enumerate(keys.to_pylist()):
        seen.setdefault(key, position)
    return sorted(seen.values())


def unreadable_files(fs: pafs.FileSystem, files: list[str]) -> dict[str, str]:
    """{file: reason} for each of ``files`` that cannot be read whole (page CRCs checked), or is gone."""
    reasons = {path: _read_whole(fs, path) for path in files}
    return {path: reason or "missing" for path, reason in reasons.items() if not isinstance(reason, pa.Table)}


def merge_index_parts(fs: pafs.FileSystem, root: str, run_id: str) -> int:
    """Merge the ``index/part-*`` files into ``index/run-<run_id>.parquet``, then delete them (a reader
    that lists the folder in between sees entries twice and drops the repeats). Returns parts merged."""
    parts = [path for path in committed_files(fs, root, "index") if os.path.basename(path).startswith(INDEX_PART)]
    if not parts:
        return 0
    with fs.open_input_file(parts[0]) as handle:
        metadata = pq.read_schema(handle).metadata
    merged = pads.dataset(parts, format=VERIFIED_PARQUET, filesystem=fs, schema=INDEX_SCHEMA).to_table()
    merged = merged.sort_by([("video_id", "ascending"), ("file", "ascending")]).replace_schema_metadata(metadata)
    name = f"{root}/index/run-{run_id}.parquet"
    if fs.get_file_info(name).type == pafs.FileType.File:  # a second merge in the same run
        with fs.open_input_file(name) as handle:
            merged = pa.concat_tables([read_verified(handle).read(), merged])
    publish(fs, name, parquet_bytes(merged))
    for path in parts:
        fs.delete_file(path)
    return len(parts)


# -- taking over an output: the state a run resumes from -------------------------------------------


@dataclass
class CommitState:
    """What an output holds, per video (never per frame for finished videos, so it grows with inputs).

    ``frames[v]``: frames of ``v`` in committed shards; ``sampled[v]``: frames its sampling selected;
    ``failed[v]``: frame indices in error rows, or None when the whole input failed; ``done[v]``: the
    committed frame indices, kept only for videos not finished or with error rows (those a run reads
    again, or whose frames must be told apart from their failed ones)."""

    frames: dict[str, int]
    sampled: dict[str, int]
    failed: dict[str, set[int] | None]
    done: dict[str, set[int]]

    def finished(self, video_id: str) -> bool:
        """Whether nothing is left to do: the input failed as a whole, or every sampled frame is in
        the shards or the errors."""
        if video_id in self.failed and self.failed[video_id] is None:
            return True
        if video_id not in self.sampled:
            return False
        settled = len(self.done.get(video_id, set()) | self.failed[video_id]) if video_id in self.failed \
            else self.frames[video_id]
        return settled >= self.sampled[video_id]


def commit_state(entries: pa.Table, errors: pa.Table) -> CommitState:
    """`CommitState` of index ``entries`` (`INDEX_SCHEMA`) and error rows (``video_id``, ``frame_indices``)."""
    failed: dict[str, set[int] | None] = {}
    for video_id, frames in zip(errors["video_id"].to_pylist(), errors["frame_indices"].to_pylist()):
        if not frames:
            failed[video_id] = None
        elif failed.get(video_id, set()) is not None:
            failed.setdefault(video_id, set()).update(frames)
    counts = pa.table({"video_id": entries["video_id"], "frames": pc.list_value_length(entries["frame_indices"]),
                       "sampled_frames": entries["sampled_frames"]})
    per_video = counts.group_by("video_id").aggregate([("frames", "sum"), ("sampled_frames", "max")])
    ids = per_video["video_id"].to_pylist()
    frames = dict(zip(ids, per_video["frames_sum"].to_pylist()))
    sampled = {v: s for v, s in zip(ids, per_video["sampled_frames_max"].to_pylist()) if s is not None}
    unsettled = [v for v in ids if v in failed or v not in sampled or frames[v] < sampled[v]]
    done: dict[str, set[int]] = {}
    if unsettled:
        wanted = entries.filter(pc.is_in(entries["video_id"], pa.array(unsettled, pa.string())))
        for video_id, indices in zip(wanted["video_id"].to_pylist(), wanted["frame_indices"].to_pylist()):
            done.setdefault(video_id, set()).update(indices)
    return CommitState(frames, sampled, failed, done)


def read_commit_state(output: str) -> CommitState:
    """What ``output`` holds, read only (no clean-up, no adoption: see `prepare_output` for that).

    Raises:
        DamagedOutputError: an index or error file cannot be read.
    """
    fs, root = filesystem_and_path(output)
    damaged: dict[str, str] = {}
    errors = _read_errors(fs, root, damaged)
    if damaged:
        raise DamagedOutputError(output, damaged)
    return commit_state(read_index(fs, root).entries, errors)


@dataclass
class PreparedOutput:
    """What `prepare_output` found and did."""

    state: CommitState
    index: OutputIndex
    temporaries_removed: int
    adopted: list[str]  # shards committed by this run's start (written, then not indexed by a killed run)
    set_aside: list[str]  # damaged files moved to OUT/damaged/


def prepare_output(output: str, metadata: dict, set_aside: bool) -> PreparedOutput:
    """Make the output consistent before a run writes to it, and read what it holds. Call it only while
    holding the output's lease (`pipeline.lease`): it removes what other writers left.

    1. Removes temporary files (a killed writer's partial files).
    2. Checks each committed shard against the index: a shard that is missing, or whose size differs
       from what its index entry recorded (truncated or overwritten), is damaged; an index or error
       file that cannot be read is damaged.
    3. Adopts each shard the index does not name (a writer killed between a shard and its index entry),
       when it reads back whole, was made with ``metadata`` and holds whole frames; otherwise it is damaged.
    4. Damaged files: with ``set_aside`` they are moved to ``OUT/damaged/<folder>/`` and their index
       entries dropped, so their frames are encoded again; without, `DamagedOutputError` names them.

    Raises:
        DamagedOutputError: damaged files and not ``set_aside``.
        OSError: the output cannot be read or written.
    """
    fs, root = filesystem_and_path(output)
    removed = _remove_temporaries(fs, root)
    damaged: dict[str, str] = {}  # path → what is wrong
    moved: list[str] = []
    try:
        index = read_index(fs, root)
    except DamagedOutputError as error:
        damaged.update(error.damaged)
        index = None
    errors = _read_errors(fs, root, damaged)
    if damaged and set_aside:  # unreadable index or error files: the shards they named are adopted below
        moved = sorted(damaged)
        _set_aside(fs, root, moved)
        damaged = {}
        index, errors = read_index(fs, root), _read_errors(fs, root, damaged)
    adopted = []
    if index is not None:
        sizes = {info.base_name: info.size for info in _listing(fs, f"{root}/shards")}
        recorded = dict(zip(index.entries["file"].to_pylist(), index.entries["file_bytes"].to_pylist()))
        for name, size in recorded.items():
            if sizes.get(name) != size:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes"
                damaged[f"{root}/shards/{name}"] = f"{found}, committed with {size} bytes"
        anyres = bool(metadata["preprocessing"]["anyres"])
        if set_aside:  # a repair: also read every committed shard whole, pages checked, and check it as a reader
            for path in (f"{root}/shards/{name}" for name in recorded):
                read = _read_shard(fs, path, metadata, anyres) if path not in damaged else None
                if isinstance(read, str):
                    damaged[path] = read
        claimed = _Claimed(index.entries)
        for name in sorted(set(sizes) - set(recorded)):
            kept, problem = _adopt(fs, root, name, metadata, anyres, claimed)
            if problem:
                damaged[f"{root}/shards/{name}"] = problem
            elif kept:
                adopted.append(name)
    if damaged and not set_aside:
        raise DamagedOutputError(output, damaged)
    if damaged:
        _set_aside(fs, root, sorted(damaged))
        moved += sorted(damaged)
    if damaged or adopted:
        index = read_index(fs, root)
    return PreparedOutput(commit_state(index.entries, errors), index, removed, adopted, moved)


def _listing(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """Committed-looking files of ``directory`` (no dot-files); none when it does not exist."""
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    return [info for info in fs.get_file_info(pafs.FileSelector(directory))
            if info.type == pafs.FileType.File and not info.base_name.startswith(".")]


def _remove_temporaries(fs: pafs.FileSystem, root: str) -> int:
    removed = 0
    for directory in (root, *(f"{root}/{sub}" for sub in ("shards", "index", "errors", "runs"))):
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.base_name.startswith(TEMP_PREFIX):
                fs.delete_file(info.path)
                removed += 1
    return removed


def read_parquet_files(fs: pafs.FileSystem, files: list[str], schema: pa.Schema, output: str) -> pa.Table:
    """The rows of ``files`` (each page checked against its CRC) as one table of ``schema``.

    Raises:
        DamagedOutputError: naming each of ``files`` that cannot be read.
    """
    try:
        return pads.dataset(files, format=VERIFIED_PARQUET, filesystem=fs, schema=schema).to_table()
    except UNREADABLE as error:
        bad = unreadable_files(fs, files) or {os.path.dirname(files[0]): str(error)}  # else: the folder read
        raise DamagedOutputError(output, bad) from error


def _read_errors(fs: pafs.FileSystem, root: str, damaged: dict[str, str]) -> pa.Table:
    """``video_id`` and ``frame_indices`` of every readable error file; unreadable ones go into ``damaged``."""
    files = committed_files(fs, root, "errors")
    try:
        return read_parquet_files(fs, files, ERROR_SCHEMA, root)
    except DamagedOutputError as error:
        damaged.update(error.damaged)
        return read_parquet_files(fs, [path for path in files if path not in error.damaged], ERROR_SCHEMA, root)


def _read_shard(fs: pafs.FileSystem, path: str, metadata: dict,
                anyres: bool) -> tuple[pa.Table, pq.FileMetaData, int] | str:
    """The shard at ``path`` read whole (pages checked) with its footer and size, or what is wrong with
    it: unreadable, settings metadata that does not parse or differs from ``metadata``, other columns,
    or frames lacking views."""
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            parquet = read_verified(handle)
            table = parquet.read()
    except UNREADABLE as error:
        return f"unreadable: {_first_line(error)}"
    try:
        recorded = read_file_metadata(table.schema)
    except ValueError:  # JSON (or its text) damaged
        return "unreadable: its settings metadata does not parse"
    differing = differing_settings(recorded, {"schema_version": SCHEMA_VERSION, **metadata})
    if differing:
        return f"made with other settings ({', '.join(differing)})"
    if not table.schema.remove_metadata().equals(shard_schema(int(metadata["hidden_size"]))):
        return f"its columns differ from the shard schema: {table.schema.remove_metadata()}"
    problems = incomplete_frames(table, anyres)
    if problems:
        return f"{len(problems)} frame(s) lack views (first: {problems[0]})"
    return table, parquet.metadata, size


class _Claimed:
    """The committed (video_id, frame_index) keys of the videos asked about, and those adopted since."""

    def __init__(self, entries: pa.Table) -> None:
        self.entries = entries
        self.known: dict[str, set[int]] = {}

    def frames(self, video_id: str) -> set[int]:
        if video_id not in self.known:
            rows = self.entries.filter(pc.equal(self.entries["video_id"], video_id))
            self.known[video_id] = {i for frames in rows["frame_indices"].to_pylist() for i in frames}
        return self.known[video_id]


def _adopt(fs: pafs.FileSystem, root: str, name: str, metadata: dict, anyres: bool,
           claimed: _Claimed) -> tuple[bool, str | None]:
    """Commit the un-indexed shard ``name`` by writing its index entries, unless a frame of it is already
    committed (a write stopped after its frames were committed elsewhere): then it is deleted. Returns
    (whether it was committed, why it can be neither: damaged)."""
    path = f"{root}/shards/{name}"
    read = _read_shard(fs, path, metadata, anyres)
    if isinstance(read, str):
        return False, f"not committed, and {read}"
    table, footer, size = read
    entries = index_entries(table, name, size, row_group_rows(footer))
    rows = list(zip(entries["video_id"].to_pylist(), entries["frame_indices"].to_pylist()))
    if any(claimed.frames(video_id) & set(frames) for video_id, frames in rows):
        fs.delete_file(path)
        logger.warning("deleted %s: written by a write that was stopped, its frames are committed elsewhere", path)
        return False, None
    for video_id, frames in rows:
        claimed.frames(video_id).update(frames)
    publish(fs, f"{root}/index/{name}", parquet_bytes(entries.replace_schema_metadata(table.schema.metadata)))
    return True, None


def _set_aside(fs: pafs.FileSystem, root: str, paths: list[str]) -> None:
    """Move ``paths`` to ``OUT/damaged/<folder>/`` and drop the index entries naming moved shards."""
    shards = set()
    for path in paths:
        folder = os.path.basename(os.path.dirname(path))
        target = f"{root}/{DAMAGED}/{folder}"
        fs.create_dir(target, recursive=True)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.move(path, f"{target}/{os.path.basename(path)}")
        if folder == "shards":
            shards.add(os.path.basename(path))
        logger.warning("set aside %s in %s/", path, target)
    if not shards:
        return
    for index_file in committed_files(fs, root, "index"):
        with fs.open_input_file(index_file) as handle:
            table = pq.read_table(handle)
        keep = pc.invert(pc.is_in(table["file"], pa.array(sorted(shards), pa.string())))
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)
        if kept.num_rows:
            publish(fs, index_file, parquet_bytes(kept))
        else:
            fs.delete_file(index_file)


def error_files(output: str) -> set[str]:
    """Paths of the complete files in ``OUT/errors``."""
    return set(committed_files(*filesystem_and_path(output), "errors"))


def read_error_rows(output: str, files: set[str]) -> list[dict]:
    """The error rows of ``files`` (from `error_files`), sorted by source path and frames."""
    if not files:
        return []
    fs, _ = filesystem_and_path(output)
    rows = pads.dataset(sorted(files), format=VERIFIED_PARQUET, filesystem=fs).to_table().to_pylist()
    return sorted(rows, key=lambda row: (row["source_path"], row["frame_indices"]))
