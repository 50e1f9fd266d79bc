"""The output's data contract, shared by the write path and the read path: the shard, error and encoded-row
schemas, the settings metadata every file records, and the Arrow builders for tokens."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# 2: source_info; 3: whole frames per shard, committed through OUT/index/; 4: what frames each row and each
# token stands for (rows of temporal methods cover windows of frames); 5: the attempt that made each row, the
# source's unreadable tail, error rows that say whether a retry may succeed
SCHEMA_VERSION = "5"
READABLE_VERSIONS = ("3", "4", "5")  # 1 and 2 had no commit index
METADATA_KEY = b"video_token_cache"  # file-level key holding the JSON metadata of a shard


def shard_schema(hidden_size: int, version: str = SCHEMA_VERSION) -> pa.Schema:
    """One row per frame (or AnyRes tile) of kept tokens; with a temporal method, one row per window of
    frames. Version 4 added ``frame_indices``/``timestamps_s`` (the frames the row stands for, in time order;
    ``frame_index``/``timestamp_s`` are the first of them) and, per token, ``first_frames``/``last_frames``
    (the first and last frame it stands for); versions 1-3 lack those four columns (`upgrade_rows`).
    Version 5 added ``attempt`` (which try of the input made the row: 1 for its first, `pipeline.failures`)
    and ``source_info.unreadable_tail``."""
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
        ("source_info", source_info_type(version)),
        ("attempt", pa.int32()),
    ]
    if int(version) < 5:
        fields = fields[:-1]
    if int(version) < 4:
        fields = [(name, type_) for name, type_ in fields if name not in PROVENANCE_COLUMNS]
    return pa.schema(fields)


# The columns version 4 added: the frames each row and each token stand for.
PROVENANCE_COLUMNS = ("frame_indices", "timestamps_s", "first_frames", "last_frames")


def upgrade_rows(table: pa.Table, hidden_size: int) -> pa.Table:
    """Shard rows of versions 1-4 in today's schema: before 4 each row stands for its own frame, and so does
    each of its tokens; before 5 the attempt is unknown (null) and so is ``source_info.unreadable_tail``.
    Today's rows are returned as they are."""
    if "attempt" in table.column_names:
        return table
    rows = table.num_rows
    columns: dict[str, pa.Array] = {"attempt": pa.nulls(rows, pa.int32())}
    if "frame_indices" not in table.column_names:
        one = np.ones(rows, dtype=np.int32)
        frames = table["frame_index"].combine_chunks()
        counts = table["num_tokens"].to_numpy()
        per_token = ragged(pc.take(frames, pa.array(np.repeat(np.arange(rows), counts))), counts, pa.int32())
        columns.update({
            "frame_indices": ragged(frames, one, pa.int32()),
            "timestamps_s": ragged(table["timestamp_s"].combine_chunks(), one, pa.float64()),
            "first_frames": per_token,
            "last_frames": per_token,
        })
    info = table["source_info"].combine_chunks()
    columns["source_info"] = pa.StructArray.from_arrays(
        [info.field(f.name) if f.name in info.type.names else pa.nulls(rows, f.type) for f in SOURCE_INFO],
        fields=list(SOURCE_INFO), mask=info.is_null())
    schema = shard_schema(hidden_size)
    return pa.Table.from_arrays([columns[name] if name in columns else table[name] for name in schema.names],
                                schema=schema)


# What the decoder learnt about the input, the same on every row of it. Videos: the video stream decoded
# (codec, index, display rotation applied, upright size), presented frames, average rate, duration, where
# timestamp_s comes from ("pts", or "frame_rate" for files without presentation timestamps), how many
# frames the sampling selected, and (version 5) why the container could not be read to its end, if it could
# not: the timeline, and so the sampling, then covers the part before the damage. Images: format, upright
# size, time_source "none".
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
        ("unreadable_tail", pa.string()),
    ]
)


def source_info_type(version: str = SCHEMA_VERSION) -> pa.StructType:
    """`SOURCE_INFO` as schema ``version`` wrote it (before 5: no ``unreadable_tail``)."""
    return SOURCE_INFO if int(version) >= 5 else pa.struct([f for f in SOURCE_INFO if f.name != "unreadable_tail"])


def source_info_array(infos: list[dict]) -> pa.StructArray:
    """``SOURCE_INFO`` values from dicts (keys an input does not have are null)."""
    return pa.array(infos, type=SOURCE_INFO)


ERROR_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source_path", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        # the sampled frames this error covers; empty: every frame of the input not in the shards (it could
        # not be opened or probed, so its frames are not known)
        ("frame_indices", pa.list_(pa.int32())),
        # version 5: whether a later run tries these frames again (a stall, a death, an unexpected error, a read
        # that failed: `pipeline.failures`); false: the input's own fault, for good
        ("retryable", pa.bool_()),
        ("attempt", pa.int32()),  # which try of the input failed so (1 for its first); null before version 5
        ("sampled_frames", pa.int32()),  # frames the input's sampling selects; null when it was not probed
    ]
)
# Error files of versions 3-4 lack the last three columns: read, they are null (retryable null: for good).


# Encoded rows: what the encoder actors hand the sink, one of three kinds (`kind_masks`):
#  * a unit: one method's (``spec``) atomic commit unit, every shard column but the first two as a list over
#    the unit's shard rows (a frame's views; a temporal segment's windows). Ray Data cuts blocks only between
#    rows, so a unit never lands in two shard files.
#  * an error: ``spec``'s error row (`ERROR_SCHEMA`: ``error_type`` set, ``error_frames`` its frames).
#  * a plan: the input's sampled frames (``sampled`` set, ``spec`` null), for the run's reconciliation.
ENCODED_EXTRA = [("spec", pa.int16()), ("error_type", pa.string()), ("error_message", pa.string()),
                 ("error_frames", pa.list_(pa.int32())), ("retryable", pa.bool_()), ("error_attempt", pa.int32()),
                 ("sampled_frames", pa.int32()), ("sampled", pa.list_(pa.int32()))]
SCALAR_COLUMNS = ("video_id", "source_path")  # one value per encoded row; every other shard column is a list


def encoded_schema(shard: pa.Schema) -> pa.Schema:
    """The encoded rows' schema for shards of ``shard`` (see above)."""
    fields = [f if f.name in SCALAR_COLUMNS else pa.field(f.name, pa.list_(f.type)) for f in shard]
    return pa.schema(fields + [pa.field(name, type_) for name, type_ in ENCODED_EXTRA])


def encoded_rows(columns: dict[str, pa.Array | list], encoded: pa.Schema) -> pa.Table:
    """A table of ``encoded`` from the columns given; every other column null."""
    count = len(next(iter(columns.values())))
    arrays = [columns[f.name] if f.name in columns else pa.nulls(count, f.type) for f in encoded]
    return pa.Table.from_arrays([a if isinstance(a, (pa.Array, pa.ChunkedArray)) else pa.array(a, f.type)
                                 for a, f in zip(arrays, encoded)], schema=encoded)


def kind_masks(table: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Boolean masks of an encoded table's units, error rows and plan rows."""
    errors = table["error_type"].is_valid()
    plans = table["sampled"].is_valid()
    units = pc.and_(pc.invert(errors), pc.invert(plans))
    return units, errors, plans


def split_encoded(table: pa.Table, specs: int) -> list[tuple[pa.Table, pa.Table]]:
    """Per each of the ``specs`` methods: (its units, its error rows in `ERROR_SCHEMA`) of an encoded table."""
    units, errors, _ = kind_masks(table)
    split = []
    for spec in range(specs):
        mine = pc.equal(table["spec"], spec)
        failed = table.filter(pc.and_(mine, errors))
        failed = pa.Table.from_arrays(
            [failed["video_id"], failed["source_path"], failed["error_type"], failed["error_message"],
             failed["error_frames"], failed["retryable"], failed["error_attempt"], failed["sampled_frames"]],
            schema=ERROR_SCHEMA)
        split.append((table.filter(pc.and_(mine, units)), failed))
    return split


def unit_token_counts(units: pa.Table) -> np.ndarray:
    """``[U]`` int64: tokens of all shard rows of each unit."""
    per_row = pc.list_flatten(units["num_tokens"]).to_numpy()
    parents = pc.list_parent_indices(units["num_tokens"]).to_numpy()
    return np.bincount(parents, weights=per_row, minlength=units.num_rows).astype(np.int64)


def unit_rows(units: pa.Table, shard: pa.Schema) -> pa.Table:
    """Units (encoded rows) → shard rows, the units' rows one after the other in their order."""
    units = units.combine_chunks()
    parents = pc.list_parent_indices(units["tile_index"])
    columns = [units[name].take(parents) if name in SCALAR_COLUMNS else pc.list_flatten(units[name])
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
