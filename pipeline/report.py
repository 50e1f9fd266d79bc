"""Per-run summary of an output directory: what was kept, how much smaller it is, what failed.

Temporal outputs (``holitom``: a row is a temporal window of source frames) are counted per source
frame: the windows, the frames they cover, the tokens the sequence places with each frame (its own
and the static tokens of a window starting there: `pipeline.sequence`) and the tokens standing for it,
and the tokens that span several frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.methods import TEMPORAL
from pipeline.store import read_parquet_files
from pipeline.reader import TokenReader
from pipeline.schema import shard_schema

HISTOGRAM_BINS = 10
FAILURES_LISTED = 20  # error rows the summary lists one by one; the rest are counted
# The shard columns the summary reads (their types do not depend on the hidden size).
KEY_SCHEMA = pa.schema([shard_schema(1).field(name) for name in ("video_id", "frame_index", "num_tokens")])
# ... and for a temporal output: the frames each row and each token stand for.
TEMPORAL_KEY_SCHEMA = pa.schema([shard_schema(1).field(name) for name in ("video_id", "frame_index", "num_tokens",
                                                                         "frame_indices", "first_frames", "last_frames")])


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
    the shards' metadata: ``None`` when the output holds no shard (every input failed).

    ``frames`` counts source frames. For a temporal output (``temporal``) the rows are windows:
    ``window_frames`` holds each window's frame count, ``tokens_per_frame`` the tokens placed with each
    source frame (by the first frame each token stands for; they add up to ``tokens``),
    ``tokens_standing_per_frame`` the tokens standing for each (a window's static tokens count on each of
    its frames), ``spanning_tokens`` the tokens standing for several frames and ``spanning_frames`` the
    frames they stand for, summed over them."""

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
    error_rows: int  # the error table as it stands (`TokenReader.errors`)
    retryable_rows: int  # of them, rows a later run tries again
    errors_by_type: dict[str, int]
    failures: list[dict]  # the error table's rows, sorted by source path and frames
    temporal: bool = False
    window_frames: np.ndarray | None = None  # temporal: [rows] source frames of each window
    tokens_standing_per_frame: np.ndarray | None = None  # temporal: [frames] tokens standing for each frame
    spanning_tokens: int = 0  # temporal: tokens standing for several frames (static tokens)
    spanning_frames: int = 0  # temporal: the frames those tokens stand for, summed over them

    @property
    def frame_views(self) -> int:
        """(source frame, view) pairs: what a full-feature cache stores patch tokens for."""
        return int(self.window_frames.sum()) if self.temporal else self.rows

    @property
    def kept_fraction(self) -> float:
        """Tokens kept / patch tokens a full-feature cache would store for the same views (temporal outputs:
        of every source frame)."""
        return self.tokens / (self.frame_views * self.patches_per_view) if self.frame_views else 0.0

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
        lines = [settings]
        if self.temporal:
            lines.append(f"videos {self.videos}  frames {self.frames} in {self.rows} temporal windows (rows)  "
                         f"tokens {self.tokens}")
            lines += self._temporal_lines()
        else:
            lines.append(f"videos {self.videos}  frames {self.frames}  rows {self.rows} ({self.views_per_frame:.2f} "
                         f"views per frame)  tokens {self.tokens}")
        if self.frames:
            placed = (" (placed with the frame: its own and a window's static tokens at its first frame)"
                      if self.temporal else "")
            lines += [
                f"tokens per frame{placed}: mean {per_frame.mean():.1f}  median {np.median(per_frame):.0f}  "
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
                     f"error rows {self.error_rows} ({self.retryable_rows} a later run tries again)" +
                     "".join(f"  {kind}: {n}" for kind, n in sorted(self.errors_by_type.items())))
        if self.failures:
            lines.append("failures:")
            lines += [f"  {failure_line(row)}" for row in self.failures[:FAILURES_LISTED]]
            if len(self.failures) > FAILURES_LISTED:
                lines.append(f"  ... {len(self.failures) - FAILURES_LISTED} more error rows (TokenReader.errors() "
                             "has them all)")
        return lines

    def _temporal_lines(self) -> list[str]:
        """Windows, frames per window, spanning tokens and tokens standing for each frame."""
        if not self.rows:
            return []
        lengths = self.window_frames
        several = lengths[lengths > 1]
        standing = self.tokens_standing_per_frame
        span = (f"{self.spanning_tokens} tokens ({self.spanning_tokens / self.tokens:.1%}) span several frames, "
                f"{self.spanning_frames / self.spanning_tokens:.1f} frames each on average"
                if self.spanning_tokens else "no token spans several frames")
        return [
            f"windows: {self.rows}, {lengths.mean():.2f} frames each on average (longest {lengths.max()}); "
            f"{len(several)} of several frames covering {several.sum()} frames, "
            f"{self.rows - len(several)} of one frame",
            f"tokens per window: mean {self.tokens / self.rows:.1f}; {span}",
            f"tokens standing for a frame (static tokens on every frame of their window): mean {standing.mean():.1f}  "
            f"median {np.median(standing):.0f}  min {standing.min()}  max {standing.max()}",
        ]


def summarize(reader: TokenReader) -> RunReport:
    """Scan the key and count columns (never the tokens) of every shard and the error table; for a
    temporal output also the frames each row and each token stand for (two int32 per token).
    An output without shards gives a report of its failures alone.

    Raises:
        pipeline.store.DamagedOutputError: a shard cannot be read (each such file named).
    """
    temporal = reader.metadata is not None and reader.metadata["method"] in TEMPORAL
    schema = TEMPORAL_KEY_SCHEMA if temporal else KEY_SCHEMA
    keys = read_parquet_files(reader.filesystem, reader.files, schema, reader.out_dir)
    frames = keys.group_by(["video_id", "frame_index"]).aggregate([("num_tokens", "sum")])
    counts = _temporal_counts(keys) if temporal else {}
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
        frames=counts["frames"] if temporal else frames.num_rows,
        rows=keys.num_rows,
        tokens=int(pc.sum(keys["num_tokens"]).as_py() or 0),
        tokens_per_frame=counts["placed"] if temporal else frames["num_tokens_sum"].to_numpy(),
        views_per_frame=(1.0 if temporal else keys.num_rows / frames.num_rows) if frames.num_rows else 0.0,
        shard_bytes=sum(reader.filesystem.get_file_info(path).size for path in reader.files),
        failed_inputs=len(set(errors["video_id"].to_pylist()) - shard_ids),
        partly_failed_videos=len(set(errors["video_id"].to_pylist()) & shard_ids),
        error_rows=errors.num_rows,
        retryable_rows=sum(bool(r) for r in errors["retryable"].to_pylist()),
        errors_by_type=errors_by_type,
        failures=sorted(errors.to_pylist(), key=lambda row: (row["source_path"], row["frame_indices"])),
        temporal=temporal,
        window_frames=counts.get("window_frames"),
        tokens_standing_per_frame=counts.get("standing"),
        spanning_tokens=counts.get("spanning_tokens", 0),
        spanning_frames=counts.get("spanning_frames", 0),
    )


def _temporal_counts(keys: pa.Table) -> dict:
    """Per source frame counts of a temporal output's rows (`TEMPORAL_KEY_SCHEMA`): frames covered, tokens
    placed with each frame (by their first frame) and standing for each, frames per window, spanning tokens.
    Frames are keyed by (video, frame number); one video's frame numbers increase with time."""
    video = pc.dictionary_encode(keys["video_id"].combine_chunks()).indices.to_numpy().astype(np.int64)

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:  # (values, their row) of a list column
        column = keys[name].combine_chunks()
        return (pc.list_flatten(column).to_numpy().astype(np.int64),
                pc.list_parent_indices(column).to_numpy().astype(np.int64))

    covered, covered_row = flat("frame_indices")
    first, token_row = flat("first_frames")
    last, _ = flat("last_frames")
    frame_keys = np.unique((video[covered_row] << 32) | covered)  # sorted: by video, then in time
    at_first = np.searchsorted(frame_keys, (video[token_row] << 32) | first)
    at_last = np.searchsorted(frame_keys, (video[token_row] << 32) | last)
    spans = np.zeros(len(frame_keys) + 1, dtype=np.int64)  # +1 at a token's first frame, -1 after its last
    np.add.at(spans, at_first, 1)
    np.add.at(spans, at_last + 1, -1)
    spanning = at_last > at_first
    return {
        "frames": len(frame_keys),
        "placed": np.bincount(at_first, minlength=len(frame_keys)),
        "standing": np.cumsum(spans)[:-1],
        "window_frames": pc.list_value_length(keys["frame_indices"].combine_chunks()).to_numpy().astype(np.int64),
        "spanning_tokens": int(spanning.sum()),
        "spanning_frames": int((at_last - at_first + 1)[spanning].sum()),
    }
