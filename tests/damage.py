"""Damaging committed files in place, the way a bad disk or a partial overwrite does."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def inside_tokens_page(path: Path) -> int:
    """An offset inside the compressed data of the tokens column's last page (a page header, statistics or an
    unused footer byte may be damaged without changing what is read; page data never is)."""
    metadata = pq.read_metadata(path)
    [chunk] = [metadata.row_group(0).column(i) for i in range(metadata.num_columns)
               if metadata.row_group(0).column(i).path_in_schema.startswith("tokens.")]
    return (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 2
