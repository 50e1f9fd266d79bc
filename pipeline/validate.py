"""The shard contract, checked the same way where shards are committed (`pipeline.repair`: adopting a shard,
repairing an output) and where they are read (`pipeline.reader`): a shard's settings metadata parses and
equals what its output records, its columns are the shard schema of its version, and every frame it holds
has all its views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from pipeline.schema import differing_settings, expected_tiles, read_file_metadata, shard_schema


@dataclass(frozen=True)
class ContractProblem:
    """What is wrong with a shard: ``damaged`` (its settings metadata does not parse), ``settings`` (made
    with other settings than expected), ``columns`` (not the shard schema of its version)."""

    kind: Literal["damaged", "settings", "columns"]
    message: str


def shard_contract(schema: pa.Schema, expected: dict) -> ContractProblem | None:
    """Check a shard's Arrow ``schema`` (with its key-value metadata) against ``expected``, the settings
    metadata of its output (`pipeline.schema.read_file_metadata` form, ``schema_version`` included)."""
    try:
        recorded = read_file_metadata(schema)
    except ValueError:  # its JSON (or the text of it) damaged
        return ContractProblem("damaged", "its settings metadata does not parse")
    differing = differing_settings(recorded, expected)
    if differing:
        return ContractProblem("settings", f"made with other settings ({', '.join(differing)})")
    columns = schema.remove_metadata()
    wanted = shard_schema(int(expected["hidden_size"]), expected["schema_version"])
    if not columns.equals(wanted):
        return ContractProblem("columns", f"its columns {columns} differ from the shard schema {wanted}")
    return None


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
