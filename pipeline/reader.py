"""Read a run's shards back as per-video token tensors, touching only the row groups a video lives in.

`TokenReader(out_dir)` reads every shard's footer once (schema version, run metadata: a directory
mixing models or methods is refused) and, on first need, the ``video_id`` column of every shard,
which maps each video to the (file, row group) pairs holding its rows. ``load(video_id)`` then reads
only those row groups. The job writes shard rows sorted by key in small row groups, so one video is
one or two row groups per file it landed in.

An output without shards (a run whose every input failed, or one stopped before its first commit) is
still an output: it opens with no videos and no run metadata, and ``errors()`` says what failed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.inputs import committed_files, filesystem_and_path
from pipeline.schema import ERROR_SCHEMA, SCHEMA_VERSION, read_file_metadata, shard_schema

# Metadata fields that may differ between shards of one output without changing what the tokens mean.
IGNORED_METADATA = ("model_revision",)  # None for a local copy of the same checkpoint


class ShardFormatError(ValueError):
    """Shards this reader cannot interpret: unknown schema version, or unexpected columns."""


class MixedShardsError(ValueError):
    """One output directory holds shards made with different models, layers, methods or preprocessing."""


@dataclass(frozen=True)
class View:
    """The kept tokens of one view of a frame: the global view (``tile_index == -1``) or one AnyRes tile."""

    tile_index: int
    tokens: torch.Tensor  # [n, C] float16
    positions: torch.Tensor  # [n] int16: row-major patch index; -1 for the merged extra token
    scores: torch.Tensor  # [n] float32: CLS-attention importance

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class Frame:
    """One sampled frame (or an image): its global view's tokens, and its AnyRes tiles when tiled."""

    frame_index: int
    timestamp_s: float
    grid_rows: int
    grid_cols: int
    global_view: View
    tiles: tuple[View, ...] = ()  # row-major over the grid_rows × grid_cols grid; empty when not tiled

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


@dataclass(frozen=True)
class _Shard:
    path: str
    metadata: pq.FileMetaData


class TokenReader:
    """Random access to the videos of one output directory (local path or pyarrow filesystem URI).

    ``metadata`` is the run metadata every shard records (model, layer, method, patch grid,
    preprocessing, sampling); it is ``None`` when the output holds no shard, since only shards record
    how tokens were made (the run record, ``OUT/manifest.json``, says how the run was configured).
    Such an output has no videos: ``len(reader) == 0``, ``video_ids() == []``, and ``errors()`` holds
    the inputs that failed.

    Raises:
        FileNotFoundError: ``out_dir`` is not the output of an encoding run: it holds no shard, no
            error file and no run record.
        ShardFormatError: a shard has another schema version or unexpected columns.
        MixedShardsError: the shards were made with different models, layers, methods or preprocessing.
    """

    def __init__(self, out_dir: str, cache_row_groups: int = 8) -> None:
        self.out_dir = str(out_dir)
        self.filesystem, self._root = filesystem_and_path(self.out_dir)  # pyarrow filesystem of the output
        self._shards = self._open_shards()
        self.metadata: dict | None = self._common_metadata() if self._shards else None
        self._index: dict[str, list[tuple[int, int]]] | None = None
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cache_size = cache_row_groups
        self.row_groups_read = 0  # row groups read from storage so far (cache hits not counted)

    @property
    def hidden_size(self) -> int | None:
        """Width of the stored tokens; ``None`` when the output holds no shard."""
        return int(self.metadata["hidden_size"]) if self.metadata is not None else None

    @property
    def files(self) -> list[str]:
        return [shard.path for shard in self._shards]

    def video_ids(self) -> list[str]:
        """Every video with tokens, in storage order (by file, then row group, then id)."""
        return list(self._video_index())

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._video_index()

    def __len__(self) -> int:
        return len(self._video_index())

    def row_groups(self, video_id: str) -> list[tuple[str, int]]:
        """The (file, row group) pairs holding ``video_id``'s rows: all that `load` reads."""
        return [(self._shards[f].path, g) for f, g in self._locate(video_id)]

    def first_row_group(self, video_id: str) -> tuple[int, int]:
        """(file number, row group) where ``video_id``'s rows begin: videos sharing it are neighbours."""
        return self._locate(video_id)[0]

    def __getstate__(self) -> dict:
        # DataLoader workers started with "spawn" get a copy: keep the index, drop cached row groups.
        return {"out_dir": self.out_dir, "cache_row_groups": self._cache_size, "index": self._index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["out_dir"], state["cache_row_groups"])
        self._index = state["index"]

    def load(self, video_id: str) -> VideoTokens:
        """The video's frames in time order, each with its views' tokens as torch tensors."""
        parts = [self._row_group(f, g) for f, g in self._locate(video_id)]
        table = pa.concat_tables(parts)
        table = table.filter(pc.equal(table["video_id"], video_id))
        table = table.sort_by([("frame_index", "ascending"), ("tile_index", "ascending")])
        views = _views(table, self.hidden_size)
        columns = {name: table[name].to_pylist() for name in ("frame_index", "timestamp_s", "grid_rows", "grid_cols")}
        starts = [0, *(np.flatnonzero(np.diff(table["frame_index"].to_numpy())) + 1).tolist()]
        frames = []
        for start, stop in zip(starts, [*starts[1:], table.num_rows]):
            if views[start].tile_index != -1:
                raise ShardFormatError(f"{video_id} frame {columns['frame_index'][start]}: no global view (tile_index -1)")
            frames.append(
                Frame(
                    frame_index=columns["frame_index"][start],
                    timestamp_s=columns["timestamp_s"][start],
                    grid_rows=columns["grid_rows"][start],
                    grid_cols=columns["grid_cols"][start],
                    global_view=views[start],
                    tiles=tuple(views[start + 1 : stop]),
                )
            )
        source = table["source_path"][0].as_py()
        return VideoTokens(video_id=video_id, source_path=source, frames=tuple(frames), metadata=self.metadata,
                           source_info=table["source_info"][0].as_py())

    def errors(self) -> pa.Table:
        """The run's error table (``OUT/errors``): inputs or frames that produced no tokens, with reasons."""
        files = committed_files(self.filesystem, self._root, "errors")
        if not files:
            return ERROR_SCHEMA.empty_table()
        return pads.dataset(files, format="parquet", filesystem=self.filesystem, schema=ERROR_SCHEMA).to_table()

    # -- internals --------------------------------------------------------------------------------

    def _open_shards(self) -> list[_Shard]:
        """The footers of every shard; none when the output has only error files or a run record.

        Raises:
            FileNotFoundError: the directory has no shard, no error file and no run record.
        """
        paths = committed_files(self.filesystem, self._root, "shards")
        if (not paths and not committed_files(self.filesystem, self._root, "errors")
                and not self._has_run_record()):
            found = self.filesystem.get_file_info(self._root).type != pafs.FileType.NotFound
            what = ("holds no shard (shards/*.parquet), error file (errors/*.parquet) or run record (manifest.json)"
                    if found else "does not exist")
            raise FileNotFoundError(f"{self.out_dir} {what}: is it the --output of an encoding run?")
        shards = []
        for path in paths:
            with self.filesystem.open_input_file(path) as handle:
                shards.append(_Shard(path, pq.read_metadata(handle)))
        return shards

    def _has_run_record(self) -> bool:
        """Whether a run wrote its record here (``OUT/manifest.json``, ``OUT/runs/``), even if it committed nothing."""
        infos = self.filesystem.get_file_info([f"{self._root}/manifest.json", f"{self._root}/runs"])
        return any(info.type != pafs.FileType.NotFound for info in infos)

    def _common_metadata(self) -> dict:
        """The run metadata all shards share; raises when versions are unknown or settings differ."""
        groups: dict[str, list[str]] = {}
        parsed = {}
        for shard in self._shards:
            metadata = read_file_metadata(shard.metadata.schema.to_arrow_schema())
            version = metadata.get("schema_version")
            if version != SCHEMA_VERSION:
                raise ShardFormatError(
                    f"{shard.path}: shard schema version {version!r}, this reader reads version {SCHEMA_VERSION!r}; "
                    "re-encode, or read it with the matching release of video-token-cache"
                )
            comparable = {k: v for k, v in metadata.items() if k not in IGNORED_METADATA}
            key = repr(sorted(comparable.items()))
            groups.setdefault(key, []).append(shard.path)
            parsed[key] = metadata
        if len(groups) > 1:
            lines = [
                f"  {len(paths)} file(s) like {paths[0]}:\n    {_describe(parsed[key])}" for key, paths in groups.items()
            ]
            raise MixedShardsError(
                f"{self.out_dir} mixes shards made with different settings; tokens from different models, "
                "layers or methods must not be mixed in one dataset:\n" + "\n".join(lines) +
                "\nKeep each run in its own output directory."
            )
        metadata = next(iter(parsed.values()))
        expected = shard_schema(int(metadata["hidden_size"]))
        for shard in self._shards:
            schema = shard.metadata.schema.to_arrow_schema().remove_metadata()
            if not schema.equals(expected):
                raise ShardFormatError(f"{shard.path}: columns {schema} differ from the shard schema {expected}")
        return metadata

    def _video_index(self) -> dict[str, list[tuple[int, int]]]:
        """video_id → [(file number, row group)], read from the ``video_id`` column alone, once."""
        if self._index is None:
            index: dict[str, list[tuple[int, int]]] = {}
            for f, shard in enumerate(self._shards):
                with self.filesystem.open_input_file(shard.path) as handle:
                    ids = pq.ParquetFile(handle, metadata=shard.metadata).read(columns=["video_id"])["video_id"]
                start = 0
                for g in range(shard.metadata.num_row_groups):
                    rows = shard.metadata.row_group(g).num_rows
                    for video_id in pc.unique(ids.slice(start, rows)).to_pylist():
                        index.setdefault(video_id, []).append((f, g))
                    start += rows
            self._index = index
        return self._index

    def _locate(self, video_id: str) -> list[tuple[int, int]]:
        try:
            return self._video_index()[video_id]
        except KeyError:
            raise KeyError(f"no tokens for video_id {video_id!r} in {self.out_dir} (see .errors() for failed inputs)") from None

    def _row_group(self, f: int, g: int) -> pa.Table:
        """One row group, through a small LRU cache (neighbouring videos share row groups)."""
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shard = self._shards[f]
        with self.filesystem.open_input_file(shard.path) as handle:
            table = pq.ParquetFile(handle, metadata=shard.metadata).read_row_group(g)
        self.row_groups_read += 1
        self._cache[key] = table
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table


def _views(table: pa.Table, hidden_size: int) -> list[View]:
    """One `View` per row; the token tensors of all rows share one contiguous buffer."""
    counts = table["num_tokens"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tokens = pc.list_flatten(pc.list_flatten(table["tokens"])).to_numpy()  # [sum n * C] float16
    tokens = torch.from_numpy(np.array(tokens, dtype=np.float16).reshape(-1, hidden_size))  # [sum n, C]
    positions = torch.from_numpy(np.array(pc.list_flatten(table["positions"]).to_numpy(), dtype=np.int16))
    scores = torch.from_numpy(np.array(pc.list_flatten(table["scores"]).to_numpy(), dtype=np.float32))
    tile_index = table["tile_index"].to_pylist()
    return [
        View(tile_index=tile_index[i], tokens=tokens[a:b], positions=positions[a:b], scores=scores[a:b])
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))
    ]


def _describe(metadata: dict) -> str:
    keys = ("model", "layer", "method", "method_params", "preprocessing", "hidden_size")
    return ", ".join(f"{k}={metadata.get(k)!r}" for k in keys)
