"""The Parquet data contract: shard and error schemas, file metadata, and the Arrow builders for tokens."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "2"  # 2: source_info
METADATA_KEY = b"video_token_cache"  # file-level key holding the JSON metadata of a shard


def shard_schema(hidden_size: int) -> pa.Schema:
    """One row per frame (or AnyRes tile) of kept tokens."""
    return pa.schema(
        [
            ("video_id", pa.string()),
            ("source_path", pa.string()),
            ("frame_index", pa.int32()),
            ("timestamp_s", pa.float64()),
            ("tile_index", pa.int16()),
            ("grid_rows", pa.int16()),
            ("grid_cols", pa.int16()),
            ("num_tokens", pa.int32()),
            ("tokens", pa.list_(pa.list_(pa.float16(), hidden_size))),
            ("positions", pa.list_(pa.int16())),
            ("scores", pa.list_(pa.float32())),
            ("source_info", SOURCE_INFO),
        ]
    )


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


def encoded_schema(shard: pa.Schema) -> pa.Schema:
    """What encoder actors emit: shard rows (error columns null) and failure rows (token columns null)."""
    schema = shard
    for name, type_ in ERROR_COLUMNS:
        schema = schema.append(pa.field(name, type_))
    return schema


def with_error_columns(shard: pa.Table) -> pa.Table:
    for name, type_ in ERROR_COLUMNS:
        shard = shard.append_column(name, pa.nulls(len(shard), type_))
    return shard


def failure_table(rows: dict[str, np.ndarray], shard: pa.Schema) -> pa.Table:
    """Failure rows (``video_id``, ``source_path`` and the error columns) in the encoded schema."""
    count = len(rows["video_id"])
    columns = {name: pa.nulls(count, shard.field(name).type) for name in shard.names}
    columns["video_id"] = pa.array(rows["video_id"], pa.string())
    columns["source_path"] = pa.array(rows["source_path"], pa.string())
    columns["error_type"] = pa.array(rows["error_type"], pa.string())
    columns["error_message"] = pa.array(rows["error_message"], pa.string())
    columns["failed_frames"] = pa.array([[int(i) for i in f] for f in rows["failed_frames"]], pa.list_(pa.int32()))
    return pa.Table.from_pydict(columns, schema=encoded_schema(shard))


def split_encoded(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(shard rows in the shard schema, error rows in `ERROR_SCHEMA`) of an encoded table."""
    failed = table.column("error_type").is_valid()
    shard = table.filter(pc.invert(failed)).drop_columns([name for name, _ in ERROR_COLUMNS])
    errors = table.filter(failed)
    errors = pa.Table.from_arrays(
        [errors["video_id"], errors["source_path"], errors["error_type"], errors["error_message"], errors["failed_frames"]],
        schema=ERROR_SCHEMA,
    )
    return shard, errors


def ragged(flat: np.ndarray, counts: np.ndarray, item_type: pa.DataType) -> pa.ListArray:
    """``list<item_type>`` whose row i holds the next ``counts[i]`` items of ``flat`` (1-D, or ``[n, C]``
    for ``fixed_size_list`` items such as the tokens), built from offsets without a Python loop."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    if pa.types.is_fixed_size_list(item_type):
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
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
