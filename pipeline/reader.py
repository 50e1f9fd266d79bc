"""Read a run's shards back as per-video token tensors, touching only the row groups a video lives in.

`TokenReader(out_dir)` reads the output's commit index once (``OUT/index/*.parquet``, a few small
files: for each video, the shard files and row groups holding it, its frames, and each shard's size;
see `pipeline.index`) and the run metadata the index records (an output mixing models or methods is
refused). It opens no shard until a video is loaded, and then only the shards that video is in: a
DataLoader worker that streams its own videos opens only their files. ``load(video_id)`` reads only
the video's row groups, and checks that every frame the index names is there with all its views.
Only committed shards are read: a shard the index does not name (a write interrupted before its
commit) is invisible.

An output without shards (a run whose every input failed, or one stopped before its first commit) is
still an output: it opens with no videos and no run metadata, and ``errors()`` says what failed.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.index import OutputIndex, read_index
from pipeline.inputs import filesystem_and_path
from pipeline.schema import READABLE_VERSIONS, expected_tiles, read_file_metadata, upgrade_rows
from pipeline.state import OutputState, read_errors
from pipeline.store import UNREADABLE, DamagedOutputError, committed_files, method_folders, read_verified
from pipeline.validate import shard_contract


class ShardFormatError(ValueError):
    """Shards this reader cannot interpret: unknown schema version, unexpected columns, or a frame
    without all its views (the reader never shifts tiles into the wrong slots)."""


class MixedShardsError(ValueError):
    """One output directory holds shards made with different models, layers, methods or preprocessing."""


@dataclass(frozen=True)
class View:
    """The kept tokens of one view of a frame: the global view (``tile_index == -1``) or one AnyRes tile."""

    tile_index: int
    tokens: torch.Tensor  # [n, C] float16
    positions: torch.Tensor  # [n] int16: row-major patch index; -1 for the merged extra token
    scores: torch.Tensor  # [n] float32: importance (the rule in the metadata's method_params)
    first_frames: torch.Tensor  # [n] int32: number of the first source frame each token stands for
    last_frames: torch.Tensor  # [n] int32: ... the last (per-frame methods: the frame itself)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Frame:
    """One sampled frame (or an image): its global view's tokens, and its AnyRes tiles when tiled. With a
    temporal method (``holitom``) one temporal window: ``frame_indices`` lists its frames, ``frame_index``
    and ``timestamp_s`` are its first, and each token's ``first_frames``/``last_frames`` say which of them
    it stands for."""

    frame_index: int
    timestamp_s: float
    grid_rows: int
    grid_cols: int
    global_view: View
    tiles: tuple[View, ...] = ()  # row-major over the grid_rows × grid_cols grid; empty when not tiled
    frame_indices: tuple[int, ...] = ()  # the frames this row stands for, in time order (default: its own)
    timestamps: tuple[float, ...] = ()  # their presentation times, seconds

    def __post_init__(self) -> None:
        if not self.frame_indices:
            object.__setattr__(self, "frame_indices", (self.frame_index,))
            object.__setattr__(self, "timestamps", (self.timestamp_s,))

    @property
    def tokens(self) -> torch.Tensor:
        return self.global_view.tokens

    @property
    def positions(self) -> torch.Tensor:
        return self.global_view.positions

    @property
    def scores(self) -> torch.Tensor:
        return self.global_view.scores

    @property
    def views(self) -> tuple[View, ...]:
        """Global view first, then the tiles in row-major grid order."""
        return (self.global_view, *self.tiles)

    @property
    def num_tokens(self) -> int:
        """Tokens of all views of this frame."""
        return sum(view.num_tokens for view in self.views)


@dataclass(frozen=True)
class VideoTokens:
    """All kept tokens of one video (or image), frames in time order."""

    video_id: str
    source_path: str
    frames: tuple[Frame, ...]
    metadata: dict = field(default_factory=dict, compare=False)
    # what the decoder found (`pipeline.schema.SOURCE_INFO`): codec, stream, rotation, size, presented
    # frames, fps, duration, time_source ("pts", "frame_rate" or "none"), sampled frames
    source_info: dict = field(default_factory=dict, compare=False)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def num_tokens(self) -> int:
        return sum(frame.num_tokens for frame in self.frames)

    @property
    def timestamps_s(self) -> torch.Tensor:
        return torch.tensor([frame.timestamp_s for frame in self.frames], dtype=torch.float64)


class TokenReader:
    """Random access to the videos of one output directory (local path or pyarrow filesystem URI).

    ``metadata`` is the run metadata the output records (model, revision, layer, method, patch grid,
    preprocessing, sampling); it is ``None`` when the output holds no shard, since only shards record
    how tokens were made (the run record, ``OUT/manifest.json``, says how the run was configured).
    Such an output has no videos: ``len(reader) == 0``, ``video_ids() == []``, and ``errors()`` holds
    the inputs that failed. A reader pickles with its index (DataLoader workers do not read it again).

    Raises:
        FileNotFoundError: ``out_dir`` is not the output of an encoding run: it holds no shard, no
            error file and no run record.
        ShardFormatError: the output has another schema version (or shards but no commit index).
        MixedShardsError: the index files record different models, revisions, layers, methods or preprocessing.
        pipeline.store.DamagedOutputError: an index file cannot be read (and, from `load`, a shard).
    """

    def __init__(self, out_dir: str, cache_row_groups: int = 8) -> None:
        self.out_dir = str(out_dir)
        self.filesystem, self._root = filesystem_and_path(self.out_dir)  # pyarrow filesystem of the output
        self._cache_size = cache_row_groups
        self._set_index(self._open_index())

    def _set_index(self, index: OutputIndex) -> None:
        self._index = index
        self.metadata: dict | None = index.metadata
        self._ids = _Strings(index.entries["video_id"])  # sorted: a video's entries are found by bisection
        self._sizes = dict(zip(index.entries["file"].to_pylist(), index.entries["file_bytes"].to_pylist()))
        self._order: list[str] | None = None
        self._groups: list[list[str]] | None = None
        self._footers: dict[str, pq.FileMetaData] = {}
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self.row_groups_read = 0  # row groups read from storage so far (cache hits not counted)

    @property
    def hidden_size(self) -> int | None:
        """Width of the stored tokens; ``None`` when the output holds no shard."""
        return int(self.metadata["hidden_size"]) if self.metadata is not None else None

    @property
    def files(self) -> list[str]:
        """The committed shard files, sorted."""
        return [self._path(name) for name in sorted(self._sizes)]

    @property
    def shards_opened(self) -> int:
        """Shard files whose footer this reader has read so far."""
        return len(self._footers)

    def video_ids(self) -> list[str]:
        """Every video with tokens, in storage order (by file, then row group, then id)."""
        if self._order is None:
            self._order = [video_id for group in self.storage_groups() for video_id in group]
        return self._order

    def storage_groups(self) -> list[list[str]]:
        """The videos grouped by the (file, row group) their rows begin in, in storage order: the videos
        of one group are read together. One pass over the index, computed once."""
        if self._groups is None:
            entries = self._index.entries
            firsts = pa.table({"video_id": entries["video_id"], "file": entries["file"],
                               "group": pc.list_element(entries["row_groups"], 0)})
            firsts = firsts.sort_by([("file", "ascending"), ("group", "ascending"), ("video_id", "ascending")])
            groups: dict[tuple[str, int], list[str]] = {}
            seen: set[str] = set()
            for video_id, name, group in zip(*(firsts[c].to_pylist() for c in ("video_id", "file", "group"))):
                if video_id not in seen:  # a video's first entry in storage order holds its first rows
                    seen.add(video_id)
                    groups.setdefault((name, group), []).append(video_id)
            self._groups = list(groups.values())
        return self._groups

    def __contains__(self, video_id: str) -> bool:
        start = bisect.bisect_left(self._ids, video_id)
        return start < len(self._ids) and self._ids[start] == video_id

    def __len__(self) -> int:
        return len(self.video_ids())

    def row_groups(self, video_id: str) -> list[tuple[str, int]]:
        """The (file, row group) pairs holding ``video_id``'s rows: all that `load` reads."""
        return [(self._path(name), group) for name, group in self._locate(video_id)]

    def __getstate__(self) -> dict:
        # DataLoader workers started with "spawn" get a copy: keep the index, drop footers and row groups.
        return {"out_dir": self.out_dir, "cache_row_groups": self._cache_size, "index": self._index}

    def __setstate__(self, state: dict) -> None:
        self.out_dir = state["out_dir"]
        self.filesystem, self._root = filesystem_and_path(self.out_dir)
        self._cache_size = state["cache_row_groups"]
        self._set_index(state["index"])

    def load(self, video_id: str) -> VideoTokens:
        """The video's frames in time order, each with its views' tokens as torch tensors.

        Raises:
            KeyError: no tokens for ``video_id``.
            ShardFormatError: a frame the index names is missing, or lacks views, or a view is repeated.
            pipeline.store.DamagedOutputError: a shard holding it cannot be read back whole.
        """
        parts = [self._row_group(name, group) for name, group in self._locate(video_id)]
        table = upgrade_rows(pa.concat_tables(parts), self.hidden_size)
        table = table.filter(pc.equal(table["video_id"], video_id))
        table = table.sort_by([("frame_index", "ascending"), ("tile_index", "ascending")])
        views = _views(table, self.hidden_size)
        columns = {name: table[name].to_pylist() for name in ("frame_index", "timestamp_s", "grid_rows", "grid_cols",
                                                              "frame_indices", "timestamps_s")}
        starts = [0, *(np.flatnonzero(np.diff(table["frame_index"].to_numpy())) + 1).tolist()]
        anyres = bool(self.metadata["preprocessing"]["anyres"])
        frames = []
        for start, stop in zip(starts, [*starts[1:], table.num_rows]):
            index, rows, cols = (columns[name][start] for name in ("frame_index", "grid_rows", "grid_cols"))
            tiles = [view.tile_index for view in views[start:stop]]
            if tiles != expected_tiles(rows, cols, anyres):
                raise ShardFormatError(f"{video_id} frame {index}: views {tiles}, expected "
                                       f"{expected_tiles(rows, cols, anyres)} (in {self.row_groups(video_id)})")
            frames.append(Frame(frame_index=index, timestamp_s=columns["timestamp_s"][start], grid_rows=rows,
                                grid_cols=cols, global_view=views[start], tiles=tuple(views[start + 1 : stop]),
                                frame_indices=tuple(columns["frame_indices"][start]),
                                timestamps=tuple(columns["timestamps_s"][start])))
        committed = self._committed_frames(video_id)
        held = [i for frame in frames for i in frame.frame_indices]
        if held != committed:
            raise ShardFormatError(f"{video_id}: the index commits frames {committed}, the shards hold {held}")
        source = table["source_path"][0].as_py()
        return VideoTokens(video_id=video_id, source_path=source, frames=tuple(frames), metadata=self.metadata,
                           source_info=table["source_info"][0].as_py())

    def errors(self) -> pa.Table:
        """The output's error table as it stands (`pipeline.state.OutputState.current_errors`): inputs or
        frames that produced no tokens, with reasons and whether a later run tries them again; rows that a
        later try of their input made stale are left out, and a row names only frames still not in the shards."""
        return OutputState(self._index.entries, read_errors(self.filesystem, self._root)).current_errors()

    # -- internals --------------------------------------------------------------------------------

    def _open_index(self) -> OutputIndex:
        """The commit index, its metadata checked; empty when the output has only error files or a run record."""
        index = read_index(self.filesystem, self._root)
        if not index.files:
            shards = committed_files(self.filesystem, self._root, "shards")
            if shards:
                with self.filesystem.open_input_file(shards[0]) as handle:
                    version = read_file_metadata(pq.read_schema(handle)).get("schema_version")
                if version not in READABLE_VERSIONS:
                    raise ShardFormatError(_version_message(shards[0], version))
                raise ShardFormatError(
                    f"{self.out_dir} holds {len(shards)} shard file(s) but no commit index (index/*.parquet): none "
                    "is committed. Run the job on it again: it commits the shards it finds whole (a run killed "
                    "before its first commit leaves such an output).")
            elif not committed_files(self.filesystem, self._root, "errors") and not self._has_run_record():
                found = self.filesystem.get_file_info(self._root).type != pafs.FileType.NotFound
                folders = method_folders(self.filesystem, self._root)
                if folders:
                    raise FileNotFoundError(
                        f"{self.out_dir} holds one output per method ({', '.join(folders)}) of a run with several "
                        f"methods: open one of them, e.g. {self.out_dir.rstrip('/')}/{folders[0]}")
                what = ("holds no shard (shards/*.parquet), error file (errors/*.parquet) or run record "
                        "(manifest.json)" if found else "does not exist")
                raise FileNotFoundError(f"{self.out_dir} {what}: is it the --output of an encoding run?")
            return index
        version = index.metadata.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ShardFormatError(_version_message(index.files[0], version))
        groups: dict[str, list[str]] = {}
        for path, metadata in index.metadata_by_file.items():
            groups.setdefault(json.dumps(metadata, sort_keys=True), []).append(path)  # nested dicts in any order
        if len(groups) > 1:
            lines = [f"  {len(paths)} index file(s) like {paths[0]}:\n    "
                     f"{_describe(index.metadata_by_file[paths[0]])}" for paths in groups.values()]
            raise MixedShardsError(
                f"{self.out_dir} mixes shards made with different settings; tokens from different models, towers, "
                "revisions, layers, methods or importance rules must not be mixed in one dataset:\n"
                + "\n".join(lines) + "\nKeep each run in its own output directory.")
        return index

    def _has_run_record(self) -> bool:
        """Whether a run wrote its record here (``OUT/manifest.json``, ``OUT/runs/``), even if it committed nothing."""
        infos = self.filesystem.get_file_info([f"{self._root}/manifest.json", f"{self._root}/runs"])
        return any(info.type != pafs.FileType.NotFound for info in infos)

    def _path(self, name: str) -> str:
        return f"{self._root}/shards/{name}"

    def _entries(self, video_id: str) -> pa.Table:
        start = bisect.bisect_left(self._ids, video_id)
        stop = bisect.bisect_right(self._ids, video_id, lo=start)
        if start == stop:
            raise KeyError(f"no tokens for video_id {video_id!r} in {self.out_dir} (see .errors() for failed inputs)")
        return self._index.entries.slice(start, stop - start)

    def _locate(self, video_id: str) -> list[tuple[str, int]]:
        entries = self._entries(video_id)
        return [(name, group) for name, groups in zip(entries["file"].to_pylist(), entries["row_groups"].to_pylist())
                for group in groups]

    def _committed_frames(self, video_id: str) -> list[int]:
        return sorted(i for frames in self._entries(video_id)["frame_indices"].to_pylist() for i in frames)

    def _footer(self, name: str, handle: pa.NativeFile) -> pq.FileMetaData:
        """The shard's footer, read once and checked against the index: size, schema, metadata."""
        if name not in self._footers:
            path = self._path(name)
            if handle.size() != self._sizes[name]:
                raise DamagedOutputError(self.out_dir, {path: f"{handle.size()} bytes, committed with "
                                                           f"{self._sizes[name]} bytes"})
            try:
                footer = pq.read_metadata(handle)
                schema = footer.schema.to_arrow_schema()
            except UNREADABLE as error:
                raise DamagedOutputError(self.out_dir, {path: str(error)}) from error
            problem = shard_contract(schema, self.metadata)
            if problem is not None and problem.kind == "damaged":
                raise DamagedOutputError(self.out_dir, {path: problem.message})
            if problem is not None and problem.kind == "columns":
                raise ShardFormatError(f"{path}: {problem.message}")
            if problem is not None:
                raise MixedShardsError(f"{path}: {problem.message} than its index records")
            self._footers[name] = footer
        return self._footers[name]

    def _row_group(self, name: str, group: int) -> pa.Table:
        """One row group, through a small LRU cache (neighbouring videos share row groups)."""
        key = (name, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            with self.filesystem.open_input_file(self._path(name)) as handle:
                table = read_verified(handle, metadata=self._footer(name, handle)).read_row_group(group)
        except FileNotFoundError as error:
            raise DamagedOutputError(self.out_dir, {self._path(name): "missing"}) from error
        except (ShardFormatError, MixedShardsError):  # the footer's findings (ValueErrors), not damage
            raise
        except UNREADABLE as error:  # a page whose CRC fails, data that does not decode
            raise DamagedOutputError(self.out_dir, {self._path(name): str(error)}) from error
        self.row_groups_read += 1
        self._cache[key] = table
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table


class _Strings:
    """A string column as a sequence of Python strings, for `bisect` (no copy of the column)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, i: int) -> str:
        return self._column[i].as_py()


def _version_message(path: str, version) -> str:
    return (f"{path}: shard schema version {version!r}, this reader reads versions {', '.join(READABLE_VERSIONS)}; "
            "re-encode, or read it with the matching release of video-token-cache")


def _views(table: pa.Table, hidden_size: int) -> list[View]:
    """One `View` per row; the token tensors of all rows share one contiguous buffer."""
    counts = table["num_tokens"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tokens = pc.list_flatten(pc.list_flatten(table["tokens"])).to_numpy()  # [sum n * C] float16
    tokens = torch.from_numpy(np.array(tokens, dtype=np.float16).reshape(-1, hidden_size))  # [sum n, C]
    positions = torch.from_numpy(np.array(pc.list_flatten(table["positions"]).to_numpy(), dtype=np.int16))
    scores = torch.from_numpy(np.array(pc.list_flatten(table["scores"]).to_numpy(), dtype=np.float32))
    first = torch.from_numpy(np.array(pc.list_flatten(table["first_frames"]).to_numpy(), dtype=np.int32))
    last = torch.from_numpy(np.array(pc.list_flatten(table["last_frames"]).to_numpy(), dtype=np.int32))
    tile_index = table["tile_index"].to_pylist()
    return [
        View(tile_index=tile_index[i], tokens=tokens[a:b], positions=positions[a:b], scores=scores[a:b],
             first_frames=first[a:b], last_frames=last[a:b])
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))
    ]


def _describe(metadata: dict) -> str:
    keys = ("model", "tower", "layer", "method", "method_params", "preprocessing", "hidden_size")
    return ", ".join(f"{k}={metadata.get(k)!r}" for k in keys)
