"""Per-run summary of an output directory: what was kept, how much smaller it is, what failed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit import read_parquet_files
from pipeline.reader import TokenReader
from pipeline.schema import shard_schema

HISTOGRAM_BINS = 10
FAILURES_LISTED = 20  # error rows the summary lists one by one; the rest are counted
# The shard columns the summary reads (their types do not depend on the hidden size).
KEY_SCHEMA = pa.schema([shard_schema(1).field(name) for name in ("video_id", "frame_index", "num_tokens")])


def failure_line(row: dict) -> str:
    """``source: ErrorType: first line of the message (frames 28, 35)`` for one row of the error table."""
    frames = f" (frames {', '.join(map(str, row['frame_indices']))})" if row["frame_indices"] else ""
    lines = row["error_message"].strip().splitlines() or [""]
    more = f" [{len(lines) - 1} more lines in the error table]" if len(lines) > 1 else ""
    return f"{row['source_path']}: {row['error_type']}: {lines[0][:500]}{more}{frames}"


@dataclass
class RunReport:
    """Counts and ratios of one output directory (all frames of all videos in its shards), and its
    failures. ``model``, ``tower``, ``method``, ``importance``, ``hidden_size`` and ``patches_per_view`` come from
    the shards' metadata: ``None`` when the output holds no shard (every input failed)."""

    model: str | None
    tower: str | None
    method: str | None
    importance: str | None
    hidden_size: int | None
    patches_per_view: int | None
    videos: int
    frames: int
    rows: int
    tokens: int
    tokens_per_frame: np.ndarray  # [frames] tokens of all views of each frame
    views_per_frame: float
    shard_bytes: int
    failed_inputs: int  # inputs with no tokens at all
    partly_failed_videos: int  # videos with tokens but some frames in the error table
    error_rows: int
    errors_by_type: dict[str, int]
    failures: list[dict]  # the error table's rows, sorted by source path and frames

    @property
    def kept_fraction(self) -> float:
        """Tokens kept / patch tokens a full-feature cache would store for the same views."""
        return self.tokens / (self.rows * self.patches_per_view) if self.rows else 0.0

    @property
    def bytes_per_frame(self) -> float:
        return self.shard_bytes / self.frames if self.frames else 0.0

    @property
    def full_fp16_bytes_per_frame(self) -> float:
        """All patch tokens of every view of a frame in fp16, uncompressed."""
        return self.views_per_frame * self.patches_per_view * self.hidden_size * 2

    def histogram(self, bins: int = HISTOGRAM_BINS) -> list[tuple[float, float, int]]:
        """(low, high, frames) bins of tokens per frame."""
        if not len(self.tokens_per_frame):
            return []
        counts, edges = np.histogram(self.tokens_per_frame, bins=bins)
        return [(float(lo), float(hi), int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts)]

    def lines(self) -> list[str]:
        per_frame = self.tokens_per_frame
        settings = (f"model {self.model} ({self.tower} tower)  method {self.method}, importance {self.importance}  "
                    f"hidden size {self.hidden_size}  "
                    f"{self.patches_per_view} patches per view" if self.model is not None
                    else "no shards: no input produced tokens (manifest.json records the run's settings)")
        lines = [
            settings,
            f"videos {self.videos}  frames {self.frames}  rows {self.rows} ({self.views_per_frame:.2f} views per frame)  "
            f"tokens {self.tokens}",
        ]
        if self.frames:
            lines += [
                f"tokens per frame: mean {per_frame.mean():.1f}  median {np.median(per_frame):.0f}  "
                f"min {per_frame.min()}  max {per_frame.max()}",
                f"kept {self.kept_fraction:.2%} of the patch tokens ({1 / self.kept_fraction:.1f}x fewer)"
                if self.kept_fraction else "kept 0 tokens",
                f"bytes per frame {self.bytes_per_frame:,.0f} on disk vs {self.full_fp16_bytes_per_frame:,.0f} "
                f"for all patch tokens in fp16 ({self.bytes_per_frame / self.full_fp16_bytes_per_frame:.2%})",
                "tokens per frame histogram:",
            ]
            widest = max(n for _, _, n in self.histogram())
            for low, high, n in self.histogram():
                lines.append(f"  {low:8.1f} - {high:8.1f} | {'#' * round(40 * n / widest):<40} {n}")
        lines.append(f"failed inputs {self.failed_inputs}  videos missing some frames {self.partly_failed_videos}  "
                     f"error rows {self.error_rows}" +
                     "".join(f"  {kind}: {n}" for kind, n in sorted(self.errors_by_type.items())))
        if self.failures:
            lines.append("failures:")
            lines += [f"  {failure_line(row)}" for row in self.failures[:FAILURES_LISTED]]
            if len(self.failures) > FAILURES_LISTED:
                lines.append(f"  ... {len(self.failures) - FAILURES_LISTED} more error rows (TokenReader.errors() "
                             "has them all)")
        return lines


def summarize(reader: TokenReader) -> RunReport:
    """Scan the key and count columns (never the tokens) of every shard and the error table.
    An output without shards gives a report of its failures alone.

    Raises:
        pipeline.commit.DamagedOutputError: a shard cannot be read (each such file named).
    """
    keys = read_parquet_files(reader.filesystem, reader.files, KEY_SCHEMA, reader.out_dir)
    frames = keys.group_by(["video_id", "frame_index"]).aggregate([("num_tokens", "sum")])
    errors = reader.errors()
    shard_ids = set(pc.unique(keys["video_id"]).to_pylist())
    errors_by_type: dict[str, int] = {}
    for kind in errors["error_type"].to_pylist():
        errors_by_type[kind] = errors_by_type.get(kind, 0) + 1
    model = tower = method = importance = patches_per_view = None
    if reader.metadata is not None:
        model, tower, method = reader.metadata["model"], reader.metadata["tower"], reader.metadata["method"]
        importance = reader.metadata["method_params"]["importance"]
        rows_, cols_ = reader.metadata["patch_grid"]
        patches_per_view = rows_ * cols_
    return RunReport(
        model=model,
        tower=tower,
        method=method,
        importance=importance,
        hidden_size=reader.hidden_size,
        patches_per_view=patches_per_view,
        videos=len(shard_ids),
        frames=frames.num_rows,
        rows=keys.num_rows,
        tokens=int(pc.sum(keys["num_tokens"]).as_py() or 0),
        tokens_per_frame=frames["num_tokens_sum"].to_numpy(),
        views_per_frame=keys.num_rows / frames.num_rows if frames.num_rows else 0.0,
        shard_bytes=sum(reader.filesystem.get_file_info(path).size for path in reader.files),
        failed_inputs=len(set(errors["video_id"].to_pylist()) - shard_ids),
        partly_failed_videos=len(set(errors["video_id"].to_pylist()) & shard_ids),
        error_rows=errors.num_rows,
        errors_by_type=errors_by_type,
        failures=sorted(errors.to_pylist(), key=lambda row: (row["source_path"], row["frame_indices"])),
    )
