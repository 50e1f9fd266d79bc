"""Making an output consistent before a run writes to it (under its lease): what a killed writer left is
removed or committed, damaged files are named or set aside, and what the output holds is read once."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.errors import first_line
from pipeline.index import OutputIndex, index_entries, read_index, row_group_rows
from pipeline.schema import SCHEMA_VERSION
from pipeline.state import OutputState, read_errors
from pipeline.store import (DAMAGED, TEMP_PREFIX, UNREADABLE, DamagedOutputError, Store, committed_files, list_files,
                            parquet_bytes, read_verified)
from pipeline.validate import incomplete_frames, shard_contract

logger = logging.getLogger(__name__)


@dataclass
class PreparedOutput:
    """What `prepare_output` found and did."""

    state: OutputState
    index: OutputIndex
    temporaries_removed: int
    adopted: list[str]  # shards committed by this run's start (written, then not indexed by a killed run)
    set_aside: list[str]  # damaged files moved to OUT/damaged/


def prepare_output(store: Store, metadata: dict, set_aside: bool) -> PreparedOutput:
    """Make the output of ``store`` consistent before a run writes to it, and read what it holds. Call it
    only while holding the output's lease: it removes what other writers left (every change goes through
    the store's fence).

    1. Removes temporary files (a killed writer's partial files).
    2. Checks each committed shard against the index: a shard that is missing, or whose size differs
       from what its index entry recorded (truncated or overwritten), is damaged; an index or error
       file that cannot be read is damaged.
    3. Adopts each shard the index does not name (a writer killed between a shard and its index entry),
       when it reads back whole, keeps the shard contract for ``metadata`` (`pipeline.validate`) and none of
       its frames is committed already; one whose frames are is deleted; otherwise it is damaged.
    4. Damaged files: with ``set_aside`` they are moved to ``OUT/damaged/<folder>/`` and their index
       entries dropped, so their frames are encoded again; without, `DamagedOutputError` names them.

    Raises:
        DamagedOutputError: damaged files and not ``set_aside``.
        OSError: the output cannot be read or written.
        pipeline.lease.LeaseLost: another job took the output over.
    """
    fs, root = store.fs, store.root
    removed = _remove_temporaries(store)
    damaged: dict[str, str] = {}  # path → what is wrong
    moved: list[str] = []
    try:
        index = read_index(fs, root)
    except DamagedOutputError as error:
        damaged.update(error.damaged)
        index = None
    errors = read_errors(fs, root, damaged)
    if damaged and set_aside:  # unreadable index or error files: the shards they named are adopted below
        moved = sorted(damaged)
        _set_aside(store, moved)
        damaged = {}
        index, errors = read_index(fs, root), read_errors(fs, root, damaged)
    adopted = []
    expected = {"schema_version": SCHEMA_VERSION, **metadata}
    if index is not None:
        sizes = {info.base_name: info.size for info in list_files(fs, f"{root}/shards")}
        recorded = dict(zip(index.entries["file"].to_pylist(), index.entries["file_bytes"].to_pylist()))
        for name, size in recorded.items():
            if sizes.get(name) != size:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes"
                damaged[f"{root}/shards/{name}"] = f"{found}, committed with {size} bytes"
        if set_aside:  # a repair: also read every committed shard whole, pages checked, and check it as a reader
            for path in (f"{root}/shards/{name}" for name in recorded):
                read = _read_shard(store, path, expected) if path not in damaged else None
                if isinstance(read, str):
                    damaged[path] = read
        claimed = _Claimed(index.entries)
        for name in sorted(set(sizes) - set(recorded)):
            kept, problem = _adopt(store, name, expected, claimed)
            if problem:
                damaged[f"{root}/shards/{name}"] = problem
            elif kept:
                adopted.append(name)
    if damaged and not set_aside:
        raise DamagedOutputError(store.output, damaged)
    if damaged:
        _set_aside(store, sorted(damaged))
        moved += sorted(damaged)
    if damaged or adopted:
        index = read_index(fs, root)
    return PreparedOutput(OutputState(index.entries, errors), index, removed, adopted, moved)


def _remove_temporaries(store: Store) -> int:
    removed = 0
    for directory in (store.root, *(store.path(sub) for sub in ("shards", "index", "errors", "runs"))):
        for info in store.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
            if info.base_name.startswith(TEMP_PREFIX):
                store.delete(info.path)
                removed += 1
    return removed


def _read_shard(store: Store, path: str, expected: dict) -> tuple[pa.Table, pq.FileMetaData, int] | str:
    """The shard at ``path`` read whole (pages checked) with its footer and size, or what is wrong with it:
    unreadable, a broken shard contract (`pipeline.validate.shard_contract`), or frames lacking views."""
    try:
        with store.fs.open_input_file(path) as handle:
            size = handle.size()
            parquet = read_verified(handle)
            table = parquet.read()
    except UNREADABLE as error:
        return f"unreadable: {first_line(error, 1000)}"
    problem = shard_contract(table.schema, expected)
    if problem is not None:
        return f"unreadable: {problem.message}" if problem.kind == "damaged" else problem.message
    problems = incomplete_frames(table, bool(expected["preprocessing"]["anyres"]))
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


def _adopt(store: Store, name: str, expected: dict, claimed: _Claimed) -> tuple[bool, str | None]:
    """Commit the un-indexed shard ``name`` by writing its index entries, unless a frame of it is already
    committed (a write stopped after its frames were committed elsewhere): then it is deleted. Returns
    (whether it was committed, why it can be neither: damaged)."""
    path = store.path(f"shards/{name}")
    read = _read_shard(store, path, expected)
    if isinstance(read, str):
        return False, f"not committed, and {read}"
    table, footer, size = read
    entries = index_entries(table, name, size, row_group_rows(footer))
    rows = list(zip(entries["video_id"].to_pylist(), entries["frame_indices"].to_pylist()))
    if any(claimed.frames(video_id) & set(frames) for video_id, frames in rows):
        store.delete(path)
        logger.warning("deleted %s: written by a write that was stopped, its frames are committed elsewhere", path)
        return False, None
    for video_id, frames in rows:
        claimed.frames(video_id).update(frames)
    store.publish(f"index/{name}", parquet_bytes(entries.replace_schema_metadata(table.schema.metadata)))
    return True, None


def _set_aside(store: Store, paths: list[str]) -> None:
    """Move ``paths`` to ``OUT/damaged/<folder>/`` and drop the index entries naming moved shards."""
    shards = set()
    for path in paths:
        folder = os.path.basename(os.path.dirname(path))
        if store.fs.get_file_info(path).type == pafs.FileType.File:
            store.move(path, f"{DAMAGED}/{folder}")
        if folder == "shards":
            shards.add(os.path.basename(path))
        logger.warning("set aside %s in %s/", path, store.path(f"{DAMAGED}/{folder}"))
    if not shards:
        return
    for index_file in committed_files(store.fs, store.root, "index"):
        with store.fs.open_input_file(index_file) as handle:
            table = pq.read_table(handle)
        keep = pc.invert(pc.is_in(table["file"], pa.array(sorted(shards), pa.string())))
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)
        if kept.num_rows:
            store.publish(f"index/{os.path.basename(index_file)}", parquet_bytes(kept))
        else:
            store.delete(index_file)
