"""The Parquet data contract: shard and error schemas, file metadata, and the Arrow builders for tokens."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# 2: source_info; 3: whole frames per shard, committed through OUT/index/; 4: what frames each row and each
# token stands for (rows of temporal methods cover windows of frames)
SCHEMA_VERSION = "4"
READABLE_VERSIONS = ("3", "4")  # 1 and 2 had no commit index
METADATA_KEY = b"video_token_cache"  # file-level key holding the JSON metadata of a shard


def shard_schema(hidden_size: int, version: str = SCHEMA_VERSION) -> pa.Schema:
    """One row per frame (or AnyRes tile) of kept tokens; with a temporal method, one row per window of
    frames. Version 4 added ``frame_indices``/``timestamps_s`` (the frames the row stands for, in time order;
    ``frame_index``/``timestamp_s`` are the first of them) and, per token, ``first_frames``/``last_frames``
    (the first and last frame it stands for). Versions 1-3 lack those four columns (`upgrade_rows`)."""
    fields = [
        ("video_id", pa.string()),
        ("source_path", pa.string()),
        ("frame_index", pa.int32()),
        ("timestamp_s", pa.float64()),
        ("frame_indices", pa.list_(pa.int32())),
        ("timestamps_s", pa.list_(pa.float64())),
        ("tile_index", pa.int16()),
        ("grid_rows", pa.int16()),
        ("grid_cols", pa.int16()),
        ("num_tokens", pa.int32()),
        ("tokens", pa.list_(pa.list_(pa.float16(), hidden_size))),
        ("positions", pa.list_(pa.int16())),
        ("scores", pa.list_(pa.float32())),
        ("first_frames", pa.list_(pa.int32())),
        ("last_frames", pa.list_(pa.int32())),
        ("source_info", SOURCE_INFO),
    ]
    if int(version) < 4:
        fields = [(name, type_) for name, type_ in fields if name not in PROVENANCE_COLUMNS]
    return pa.schema(fields)


# The columns version 4 added: the frames each row and each token stand for.
PROVENANCE_COLUMNS = ("frame_indices", "timestamps_s", "first_frames", "last_frames")


def upgrade_rows(table: pa.Table, hidden_size: int) -> pa.Table:
    """Shard rows of versions 1-3 (one frame per row) in today's schema: each row stands for its own frame,
    and so does each of its tokens. Today's rows are returned as they are."""
    if "frame_indices" in table.column_names:
        return table
    rows = table.num_rows
    one = np.ones(rows, dtype=np.int32)
    frames = table["frame_index"].combine_chunks()
    counts = table["num_tokens"].to_numpy()
    per_token = ragged(pc.take(frames, pa.array(np.repeat(np.arange(rows), counts))), counts, pa.int32())
    columns = {
        "frame_indices": ragged(frames, one, pa.int32()),
        "timestamps_s": ragged(table["timestamp_s"].combine_chunks(), one, pa.float64()),
        "first_frames": per_token,
        "last_frames": per_token,
    }
    schema = shard_schema(hidden_size)
    return pa.Table.from_arrays([columns[name] if name in columns else table[name] for name in schema.names],
                                schema=schema)


# What the decoder learnt about the input, the same on every row of it. Videos: the video stream decoded
# (codec, index, display rotation applied, upright size), presented frames, average rate, duration, where
# timestamp_s comes from ("pts", or "frame_rate" for files without presentation timestamps), and how many
# frames the sampling selected. Images: format, upright size, time_source "none".
SOURCE_INFO = pa.struct(
    [
        ("codec", pa.string()),
        ("stream_index", pa.int16()),
        ("rotation", pa.int16()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("time_source", pa.string()),
        ("sampled_frames", pa.int32()),
    ]
)


def source_info_array(infos: list[dict]) -> pa.StructArray:
    """``SOURCE_INFO`` values from dicts (keys an input does not have are null)."""
    return pa.array(infos, type=SOURCE_INFO)


ERROR_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_path", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        # frames this error covers; empty when the whole input failed (it could not be opened or probed)
        ("frame_indices", pa.list_(pa.int32())),
    ]
)


ERROR_COLUMNS = [("error_type", pa.string()), ("error_message", pa.string()), ("failed_frames", pa.list_(pa.int32()))]

# Columns with one value per view (the global view, then the AnyRes tiles); the others are per frame.
VIEW_COLUMNS = ("tile_index", "num_tokens", "tokens", "positions", "scores", "first_frames", "last_frames")
# Encoded rows: which of the run's methods (`operators.methods.MethodSpec`, by position) the row is for (an
# error row: one per method that still needed the input's frames).
SPEC_COLUMN = ("spec", pa.int16())


def encoded_schema(shard: pa.Schema) -> pa.Schema:
    """What encoder actors emit: **one row per frame**, its views' values in lists (`VIEW_COLUMNS`), so
    that Ray Data, which cuts blocks only between rows, can never put one frame's views into two shard
    files. Failure rows have the token columns null and the error columns set."""
    fields = [pa.field(f.name, pa.list_(f.type)) if f.name in VIEW_COLUMNS else f for f in shard]
    return pa.schema(fields + [pa.field(name, type_) for name, type_ in [*ERROR_COLUMNS, SPEC_COLUMN]])


def failure_table(rows: dict[str, np.ndarray], encoded: pa.Schema) -> pa.Table:
    """Failure rows (``video_id``, ``source_path`` and the error columns) in the encoded schema."""
    count = len(rows["video_id"])
    columns = {name: pa.nulls(count, encoded.field(name).type) for name in encoded.names}
    columns["video_id"] = pa.array(rows["video_id"], pa.string())
    columns["source_path"] = pa.array(rows["source_path"], pa.string())
    columns["error_type"] = pa.array(rows["error_type"], pa.string())
    columns["error_message"] = pa.array(rows["error_message"], pa.string())
    columns["failed_frames"] = pa.array([[int(i) for i in f] for f in rows["failed_frames"]], pa.list_(pa.int32()))
    return pa.Table.from_pydict(columns, schema=encoded)


def split_encoded(table: pa.Table, specs: int) -> list[tuple[pa.Table, pa.Table]]:
    """Per each of the ``specs`` methods: (its rows without the error and spec columns, its error rows in
    `ERROR_SCHEMA`) of an encoded table."""
    dropped = [name for name, _ in [*ERROR_COLUMNS, SPEC_COLUMN]]
    split = []
    for spec in range(specs):
        mine = table.filter(pc.equal(table["spec"], spec))
        failed = mine.column("error_type").is_valid()
        errors = mine.filter(failed)
        errors = pa.Table.from_arrays(
            [errors["video_id"], errors["source_path"], errors["error_type"], errors["error_message"],
             errors["failed_frames"]],
            schema=ERROR_SCHEMA,
        )
        split.append((mine.filter(pc.invert(failed)).drop_columns(dropped), errors))
    return split


def frame_token_counts(frames: pa.Table) -> np.ndarray:
    """``[F]`` int64: tokens of all views of each frame row."""
    per_view = pc.list_flatten(frames["num_tokens"]).to_numpy()
    parents = pc.list_parent_indices(frames["num_tokens"]).to_numpy()
    return np.bincount(parents, weights=per_view, minlength=frames.num_rows).astype(np.int64)


def views_of(frames: pa.Table, shard: pa.Schema) -> pa.Table:
    """Frame rows (views in lists) → shard rows, one per view, in the frames' order then the views' order."""
    parents = pc.list_parent_indices(frames["tile_index"])
    columns = [pc.list_flatten(frames[name]) if name in VIEW_COLUMNS else frames[name].take(parents)
               for name in shard.names]
    return pa.Table.from_arrays(columns, schema=shard)


def expected_tiles(grid_rows: int, grid_cols: int, anyres: bool) -> list[int]:
    """The ``tile_index`` values a complete frame has: -1 (the global view), then 0..rows·cols-1 when tiled."""
    return [-1, *range(grid_rows * grid_cols)] if anyres else [-1]


def ragged(flat: np.ndarray | pa.Array, counts: np.ndarray, item_type: pa.DataType) -> pa.ListArray:
    """``list<item_type>`` whose row i holds the next ``counts[i]`` items of ``flat`` (an Arrow array,
    a 1-D numpy array, or ``[n, C]`` for ``fixed_size_list`` items such as the tokens), built from
    offsets without a Python loop."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    if isinstance(flat, pa.Array):
        values = flat
    elif pa.types.is_fixed_size_list(item_type):
        values = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1), type=item_type.value_type), item_type.list_size
        )
    else:
        values = pa.array(flat, type=item_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def file_metadata(run_metadata: dict) -> dict[bytes, bytes]:
    """Parquet key-value metadata: schema version, model, layer, method and its parameters, preprocessing."""
    return {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **run_metadata}, sort_keys=True).encode()}


def read_file_metadata(schema: pa.Schema) -> dict:
    """The run metadata a file records (`file_metadata`), in today's form (`upgrade_metadata`); {} when none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return upgrade_metadata(json.loads(raw)) if raw else {}


def upgrade_metadata(metadata: dict) -> dict:
    """Run metadata written before the tower family was recorded (CLIP towers only: ``method_params`` held
    ``cls_attention``; no patch size; ``preprocessing`` no resize size or mean/std) in today's form, so such
    outputs stay readable and resumable by a run with the same settings. Today's metadata is returned as it is."""
    if "tower" in metadata or "cls_attention" not in metadata.get("method_params", {}):
        return metadata
    params = dict(metadata["method_params"])
    params["importance"] = {"full_width": "cls", "head_mean": "cls_head_mean"}[params.pop("cls_attention")]
    # what those versions always normalised with: CLIP's mean/std (written out: readers import no torch stack)
    preprocessing = {**metadata["preprocessing"], "resize_size": metadata["preprocessing"]["image_size"],
                     "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    patch_size = metadata["preprocessing"]["image_size"] // metadata["patch_grid"][0]  # CLIP's are whole patches
    return {**metadata, "tower": "clip", "patch_size": patch_size, "method_params": params,
            "preprocessing": preprocessing}


def differing_settings(existing: dict, expected: dict) -> list[str]:
    """The run-metadata keys (`file_metadata`) whose values differ between two files or runs, sorted:
    tokens made with any difference must not share one output."""
    return sorted(key for key in existing.keys() | expected.keys() if existing.get(key) != expected.get(key))
