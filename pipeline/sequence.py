"""Lay one video's (or AnyRes image's) kept tokens out as the flat sequence an LLaVA-family model consumes.

Per frame, in time order: the global view's tokens, then its AnyRes tiles re-assembled the way
LLaVA-NeXT stitches them (tiles placed on their grid, tokens read row by row across the whole
stitched grid, an ``image_newline`` position after each stitched row that kept a token), then each
tile's merged extra token, then an optional frame separator. The newline/separator embeddings are learned by the
language model's projector, so the sequence marks where they go (``is_separator``) with zero rows.

``order="spatial"`` (default) keeps tokens in patch raster order; ``order="score"`` reproduces the
published PruMerge order for checkpoints trained with it: descending importance score, the
merged extra token last, tiles concatenated in grid order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.reader import Frame, VideoTokens, View

Order = Literal["spatial", "score"]


@dataclass(frozen=True)
class SequenceLayout:
    """How `llava_sequence` orders tokens and where it leaves room for separator embeddings."""

    order: Order = "spatial"
    frame_separator: bool = False  # a separator position after every frame (video models' frame newline)
    tile_row_newline: bool = True  # AnyRes: a newline position after each stitched row (LLaVA-NeXT)

    def __post_init__(self) -> None:
        if self.order not in ("spatial", "score"):
            raise ValueError(f"order must be 'spatial' or 'score', got {self.order!r}")


@dataclass(frozen=True)
class TokenSequence:
    """One sample's model-ready sequence of N positions over F frames."""

    tokens: torch.Tensor  # [N, C] float16; zero rows where is_separator
    is_separator: torch.Tensor  # [N] bool: the model puts its separator/newline embedding here
    frame: torch.Tensor  # [N] int32: ordinal (0..F-1) of the frame a position belongs to or closes
    tile: torch.Tensor  # [N] int16: -1 global view, 0.. AnyRes tile (separators: -1)
    position: torch.Tensor  # [N] int16: patch index within its view; -1 merged extra token or separator
    score: torch.Tensor  # [N] float32: importance score (separators: 0)
    timestamps_s: torch.Tensor  # [F] float64: presentation time of each frame
    frame_index: torch.Tensor  # [F] int64: frame number in the source video

    def __len__(self) -> int:
        return len(self.is_separator)


def llava_sequence(video: VideoTokens, layout: SequenceLayout = SequenceLayout()) -> TokenSequence:
    """``video``'s frames concatenated in time order, laid out by ``layout`` (see the module docstring)."""
    patch_grid = tuple(video.metadata["patch_grid"])
    hidden = int(video.metadata["hidden_size"])
    parts = [_frame_sequence(frame, f, patch_grid, hidden, layout) for f, frame in enumerate(video.frames)]
    if not parts:
        raise ValueError(f"{video.video_id} has no frames")
    return TokenSequence(
        *(torch.cat(column) for column in zip(*parts)),
        timestamps_s=video.timestamps_s,
        frame_index=torch.tensor([frame.frame_index for frame in video.frames], dtype=torch.int64),
    )


def _frame_sequence(
    frame: Frame, ordinal: int, patch_grid: tuple[int, int], hidden: int, layout: SequenceLayout
) -> tuple[torch.Tensor, ...]:
    """(tokens, is_separator, frame, tile, position, score) of one frame, laid out."""
    views = frame.views
    # The frame's views in one buffer of M rows, plus row M: what a separator position holds.
    tokens = torch.cat([*(v.tokens for v in views), torch.zeros(1, hidden, dtype=torch.float16)])  # [M+1, C]
    tile = torch.cat([*(torch.full((v.num_tokens,), v.tile_index, dtype=torch.int16) for v in views),
                      torch.tensor([-1], dtype=torch.int16)])
    position = torch.cat([*(v.positions for v in views), torch.tensor([-1], dtype=torch.int16)])
    score = torch.cat([*(v.scores for v in views), torch.tensor([0.0])])
    separator = len(tokens) - 1

    starts = np.cumsum([0] + [v.num_tokens for v in views])
    order = [_view_order(frame.global_view, layout.order)]
    if frame.tiles:
        order += _tiles_order(frame, starts[1:-1], patch_grid, layout, separator)
    if layout.frame_separator:
        order.append(np.array([separator]))
    index = torch.from_numpy(np.concatenate(order))  # [N_frame] rows of the buffer
    is_separator = index == separator
    return (tokens[index], is_separator, torch.full((len(index),), ordinal, dtype=torch.int32), tile[index],
            position[index], score[index])


def _view_order(view: View, order: Order) -> np.ndarray:
    """Row order of one view's tokens: raster or descending score; merged extra tokens (-1) last."""
    positions = view.positions.numpy().astype(np.int64)
    extra = positions < 0
    if order == "spatial":
        key = np.where(extra, np.iinfo(np.int64).max, positions)
        return np.argsort(key, kind="stable")
    scores = view.scores.numpy()
    return np.lexsort((-scores, extra))  # primary: real before extra; then descending score


def _tiles_order(
    frame: Frame, tile_starts: np.ndarray, patch_grid: tuple[int, int], layout: SequenceLayout, separator: int
) -> list[np.ndarray]:
    """Buffer rows of the frame's tiles (which start at ``tile_starts``), newline rows included."""
    rows, cols = patch_grid
    if layout.order == "score":  # tiles in grid order, a newline after each row of tiles
        pieces = []
        for t, (tile, start) in enumerate(zip(frame.tiles, tile_starts)):
            pieces.append(start + _view_order(tile, "score"))
            if layout.tile_row_newline and (t + 1) % frame.grid_cols == 0:
                pieces.append(np.array([separator]))
        return pieces

    # Stitch: token p of tile t sits at stitched row (t // grid_cols) * rows + p // cols, column likewise.
    rows_of, keys, buffer_rows, extras = [], [], [], []
    width = frame.grid_cols * cols
    for t, (tile, start) in enumerate(zip(frame.tiles, tile_starts)):
        p = tile.positions.numpy().astype(np.int64)
        real = p >= 0
        stitched_row = (t // frame.grid_cols) * rows + p[real] // cols
        stitched_col = (t % frame.grid_cols) * cols + p[real] % cols
        rows_of.append(stitched_row)
        keys.append(stitched_row * width + stitched_col)
        buffer_rows.append(start + np.flatnonzero(real))
        extras.append(start + np.flatnonzero(~real))
    key, stitched_row, buffer_row = (np.concatenate(a) for a in (keys, rows_of, buffer_rows))
    ordering = np.argsort(key, kind="stable")
    buffer_row, stitched_row = buffer_row[ordering], stitched_row[ordering]
    if not layout.tile_row_newline:
        return [buffer_row, *extras]
    # A newline after the last token of each stitched row that kept any token.
    row_ends = np.flatnonzero(np.diff(stitched_row)) + 1
    pieces = []
    for segment in np.split(buffer_row, row_ends):
        if len(segment):
            pieces += [segment, np.array([separator])]
    return pieces + extras
