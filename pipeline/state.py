"""What an output holds, per input and per frame, from its commit index and its error rows.

Error rows accumulate: a run that tries an input again (`pipeline.failures`) adds rows, and frames it
commits make earlier rows about them stale. `OutputState.current_errors` is the error table as it stands:

* every try of an input has a number, ``attempt`` (1 for its first), recorded on each shard row, index
  entry and error row it made;
* a retryable row is current only while no later try of its input made anything (a row or a shard row);
* a row names only the frames still not in the shards; one with none left is not current;
* a row with no frames (the input could not be opened or probed, so its frames were not known) stands for
  every frame of the input not in the shards.

Counts per video (frames committed, frames sampled) come from the index alone; frame sets are built only for
the videos that need them (unfinished, or with error rows), so the state of an output of finished videos
grows with its videos, not its frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.failures import DECODER_FAILURES
from pipeline.index import read_index
from pipeline.schema import ERROR_SCHEMA
from pipeline.store import DamagedOutputError, committed_files, read_parquet_files


@dataclass
class VideoErrors:
    """The current error rows of one video in one output, as frame sets."""

    permanent: set[int] = field(default_factory=set)  # frames failed for good
    retryable: set[int] = field(default_factory=set)  # frames a later run tries again
    whole: str | None = None  # "permanent" / "retryable": a current row for the whole input (frames unknown)
    decoder_failures: set[int] = field(default_factory=set)  # tries of the input that ended in a decoder failure
    rows: list[dict] = field(default_factory=list)  # the current rows (`ERROR_SCHEMA`), frames trimmed


class OutputState:
    """What one output holds (see the module): ``entries`` are its index entries (`pipeline.index.INDEX_SCHEMA`),
    ``errors`` its error rows (`ERROR_SCHEMA`)."""

    def __init__(self, entries: pa.Table, errors: pa.Table) -> None:
        self.entries = entries.sort_by("video_id")
        ids = self.entries["video_id"].to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        # each video's entries, found once: (start, stop) in the sorted entries
        self._spans = dict(zip(ids[starts].tolist(), zip(starts.tolist(), [*starts[1:].tolist(), len(ids)])))
        counts = pa.table({"video_id": entries["video_id"], "frames": pc.list_value_length(entries["frame_indices"]),
                           "sampled": entries["sampled_frames"], "attempt": pc.fill_null(entries["attempt"], 0)})
        per_video = counts.group_by("video_id").aggregate([("frames", "sum"), ("sampled", "max"), ("attempt", "max")])
        ids = per_video["video_id"].to_pylist()
        self.frames: dict[str, int] = dict(zip(ids, per_video["frames_sum"].to_pylist()))
        self.sampled: dict[str, int] = {v: s for v, s in zip(ids, per_video["sampled_max"].to_pylist()) if s is not None}
        self.attempt: dict[str, int] = dict(zip(ids, per_video["attempt_max"].to_pylist()))
        self._committed: dict[str, set[int]] = {}
        rows_by_video: dict[str, list[dict]] = {}
        for row in errors.to_pylist():
            rows_by_video.setdefault(row["video_id"], []).append(row)
            self.attempt[row["video_id"]] = max(self.attempt.get(row["video_id"], 0), row["attempt"] or 0)
            if row["sampled_frames"] is not None:
                self.sampled.setdefault(row["video_id"], row["sampled_frames"])
        self.errors: dict[str, VideoErrors] = {video_id: self._current(video_id, rows)
                                               for video_id, rows in rows_by_video.items()}

    def committed(self, video_id: str) -> set[int]:
        """Frames of ``video_id`` in committed shards."""
        if video_id not in self._committed:
            start, stop = self._spans.get(video_id, (0, 0))
            frames = self.entries["frame_indices"].slice(start, stop - start).to_pylist()
            self._committed[video_id] = {i for row in frames for i in row}
        return self._committed[video_id]

    def _current(self, video_id: str, rows: list[dict]) -> VideoErrors:
        latest = self.attempt[video_id]
        committed = self.committed(video_id)
        found = VideoErrors()
        for row in sorted(rows, key=lambda r: (r["attempt"] or 0, r["frame_indices"])):
            if row["error_type"] in DECODER_FAILURES:
                found.decoder_failures.add(row["attempt"] or 0)
            retryable = bool(row["retryable"])
            if retryable and (row["attempt"] or 0) < latest:
                continue  # a later try of the input made something: this row is stale
            frames = [i for i in row["frame_indices"] if i not in committed]
            if row["frame_indices"] and not frames:
                continue  # every frame it named is in the shards now
            kind = "retryable" if retryable else "permanent"
            if row["frame_indices"]:
                (found.retryable if retryable else found.permanent).update(frames)
            elif found.whole != "permanent":
                found.whole = kind
            found.rows.append({**row, "frame_indices": frames})
        return found

    def finished(self, video_id: str) -> bool:
        """Whether no method run needs anything more of ``video_id``: it failed for good as a whole, or
        every sampled frame is in the shards or failed for good."""
        errors = self.errors.get(video_id)
        if errors is None:
            return video_id in self.sampled and self.frames.get(video_id, 0) >= self.sampled[video_id]
        if errors.whole == "permanent":
            return True
        return video_id in self.sampled and len(self.settled(video_id)) >= self.sampled[video_id]

    def settled(self, video_id: str) -> set[int]:
        """Frames of ``video_id`` a run need not try: in the shards, or failed for good."""
        errors = self.errors.get(video_id)
        return self.committed(video_id) | (errors.permanent if errors else set())

    def current_errors(self) -> pa.Table:
        """The current error rows (see the module), sorted by source path, attempt and frames."""
        rows = [row for errors in self.errors.values() for row in errors.rows]
        rows.sort(key=lambda row: (row["source_path"], row["attempt"] or 0, row["frame_indices"]))
        return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def read_errors(fs: pafs.FileSystem, root: str, damaged: dict[str, str] | None = None) -> pa.Table:
    """Every error row of the output (files of versions 3-4: the columns they lack are null).

    Raises:
        DamagedOutputError: an error file cannot be read, unless ``damaged`` is given: then each such file is
            added to it and the others are read.
    """
    files = committed_files(fs, root, "errors")
    if not files:
        return ERROR_SCHEMA.empty_table()
    try:
        return read_parquet_files(fs, files, ERROR_SCHEMA, root)
    except DamagedOutputError as error:
        if damaged is None:
            raise
        damaged.update(error.damaged)
        readable = [path for path in files if path not in error.damaged]
        return read_parquet_files(fs, readable, ERROR_SCHEMA, root) if readable else ERROR_SCHEMA.empty_table()


def read_state(fs: pafs.FileSystem, root: str) -> OutputState:
    """What the output at ``root`` holds, read only (no clean-up, no adoption: `pipeline.repair`).

    Raises:
        DamagedOutputError: an index or error file cannot be read.
    """
    errors = read_errors(fs, root)
    return OutputState(read_index(fs, root).entries, errors)
