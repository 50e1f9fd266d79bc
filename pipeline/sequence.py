"""Lay one video's (or AnyRes image's) kept tokens out as the flat sequence an LLaVA-family model consumes.

Per frame, in time order: the global view's tokens, then its AnyRes tiles re-assembled the way
LLaVA-NeXT stitches them (tiles placed on their grid, tokens read row by row across the whole
stitched grid, an ``image_newline`` position after each stitched row that kept a token), then each
tile's merged extra token, then an optional frame separator. The newline/separator embeddings are learned by the
language model's projector, so the sequence marks where they go (``is_separator``) with zero rows.

``order="spatial"`` (default) keeps tokens in patch raster order; ``order="score"`` reproduces the
published PruMerge order for checkpoints trained with it: descending importance score, the
merged extra token last, tiles concatenated in grid order.

Temporal outputs (``holitom``: a row is a temporal window of several source frames, see
`pipeline.reader.Frame`): the sequence runs over the source frames, not the rows. Each token sits with
the first source frame it stands for, so within a window the order is HoliTom's: by (first frame,
patch position), a static token (one for all the window's frames) with the window's first frame, next
to that frame's own tokens; each token keeps its original patch position (``position``). The frame
separator goes after each source frame's tokens, also after a frame left with none of its own (every
token of a fully static window sits with its first frame), so there is one separator per source
frame. ``frame`` is the ordinal of the first source frame a token stands for and ``last_frame`` of the
last (``timestamps_s[frame]`` .. ``timestamps_s[last_frame]`` is its span; a static token's
``last_frame > frame``); ``timestamps_s``/``frame_index`` list every source frame the rows cover, in
time order. ``order="score"`` orders each source frame's tokens by descending score instead. A
temporal row holds one view (HoliTom reduces global views only). Per-frame outputs are laid out as
before; there ``last_frame == frame``.
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
    frame: torch.Tensor  # [N] int32: ordinal (0..F-1) of the (first) source frame a position belongs to or closes
    tile: torch.Tensor  # [N] int16: -1 global view, 0.. AnyRes tile (separators: -1)
    position: torch.Tensor  # [N] int16: patch index within its view; -1 merged extra token or separator
    score: torch.Tensor  # [N] float32: importance score (separators: 0)
    timestamps_s: torch.Tensor  # [F] float64: presentation time of each source frame
    frame_index: torch.Tensor  # [F] int64: frame number in the source video
    # [N] int32: ordinal of the last source frame a position stands for (>= frame; temporal outputs'
    # static tokens span several frames; elsewhere == frame). Default: ``frame``.
    last_frame: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.last_frame is None:
            object.__setattr__(self, "last_frame", self.frame.clone())

    def __len__(self) -> int:
        return len(self.is_separator)


def llava_sequence(video: VideoTokens, layout: SequenceLayout = SequenceLayout()) -> TokenSequence:
    """``video``'s frames concatenated in time order, laid out by ``layout`` (see the module docstring).

    Raises:
        ValueError: the video has no frames; a source frame is covered by two rows; a token stands for
            frames its row does not cover (or ends before it starts); a row covering several frames has tiles.
    """
    patch_grid = tuple(video.metadata["patch_grid"])
    hidden = int(video.metadata["hidden_size"])
    if not video.frames:
        raise ValueError(f"{video.video_id} has no frames")
    numbers = [number for frame in video.frames for number in frame.frame_indices]
    ordinal = {number: k for k, number in enumerate(numbers)}
    if len(ordinal) != len(numbers):
        raise ValueError(f"{video.video_id}: rows cover a source frame twice: {numbers}")
    parts = []
    for frame in video.frames:
        _check_spans(video.video_id, frame)
        if len(frame.frame_indices) == 1:
            parts.append(_frame_sequence(frame, ordinal[frame.frame_indices[0]], patch_grid, hidden, layout))
        else:
            parts.append(_window_sequence(video.video_id, frame, ordinal, hidden, layout))
    tokens, is_separator, first, last, tile, position, score = (torch.cat(column) for column in zip(*parts))
    return TokenSequence(
        tokens=tokens, is_separator=is_separator, frame=first, tile=tile, position=position, score=score,
        timestamps_s=torch.tensor([t for frame in video.frames for t in frame.timestamps], dtype=torch.float64),
        frame_index=torch.tensor(numbers, dtype=torch.int64),
        last_frame=last,
    )


def _check_spans(video_id: str, frame: Frame) -> None:
    """Every token of ``frame`` stands for frames the row covers, first <= last."""
    covered = np.asarray(frame.frame_indices)
    for view in frame.views:
        first, last = view.first_frames.numpy(), view.last_frames.numpy()
        if not (np.isin(first, covered).all() and np.isin(last, covered).all() and (first <= last).all()):
            raise ValueError(f"{video_id} row of frame {frame.frame_index}: tokens stand for frames "
                             f"{sorted(set(first.tolist()) | set(last.tolist()))} (first <= last), the row "
                             f"covers {list(frame.frame_indices)}")


def _window_sequence(
    video_id: str, frame: Frame, ordinal: dict[int, int], hidden: int, layout: SequenceLayout
) -> tuple[torch.Tensor, ...]:
    """(tokens, is_separator, frame, last_frame, tile, position, score) of one temporal row: per source
    frame, the tokens whose first frame it is (by position, or by score), then its separator."""
    if frame.tiles:
        raise ValueError(f"{video_id} row of frames {list(frame.frame_indices)}: a row covering several frames "
                         "holds one view; it has tiles")
    view = frame.global_view
    tokens = torch.cat([view.tokens, torch.zeros(1, hidden, dtype=torch.float16)])  # [M+1, C]; row M: separator
    separator = len(tokens) - 1
    first, last = view.first_frames.numpy(), view.last_frames.numpy()
    positions, scores = view.positions.numpy(), view.scores.numpy()
    order, first_ordinal, last_ordinal = [], [], []
    for number in frame.frame_indices:
        rows = np.flatnonzero(first == number)
        rows = rows[_order(positions[rows], scores[rows], layout.order)]
        closed = [separator] if layout.frame_separator else []
        order.append(np.concatenate([rows, np.array(closed, dtype=np.int64)]))
        first_ordinal += [ordinal[number]] * (len(rows) + len(closed))
        last_ordinal += [ordinal[n] for n in last[rows].tolist()] + [ordinal[number]] * len(closed)
    index = torch.from_numpy(np.concatenate(order))  # [N_row] rows of the buffer
    position = torch.cat([view.positions, torch.tensor([-1], dtype=torch.int16)])
    score = torch.cat([view.scores, torch.tensor([0.0])])
    return (tokens[index], index == separator, torch.tensor(first_ordinal, dtype=torch.int32),
            torch.tensor(last_ordinal, dtype=torch.int32), torch.full((len(index),), -1, dtype=torch.int16),
            position[index], score[index])


def _frame_sequence(
    frame: Frame, ordinal: int, patch_grid: tuple[int, int], hidden: int, layout: SequenceLayout
) -> tuple[torch.Tensor, ...]:
    """(tokens, is_separator, frame, last_frame, tile, position, score) of one frame, laid out."""
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
    frame_ordinal = torch.full((len(index),), ordinal, dtype=torch.int32)
    return (tokens[index], is_separator, frame_ordinal, frame_ordinal.clone(), tile[index], position[index],
            score[index])


def _view_order(view: View, order: Order) -> np.ndarray:
    """Row order of one view's tokens: raster or descending score; merged extra tokens (-1) last."""
    return _order(view.positions.numpy(), view.scores.numpy(), order)


def _order(positions: np.ndarray, scores: np.ndarray, order: Order) -> np.ndarray:
    """Order of tokens with these positions and scores: raster or descending score; extra tokens (-1) last."""
    positions = positions.astype(np.int64)
    extra = positions < 0
    if order == "spatial":
        key = np.where(extra, np.iinfo(np.int64).max, positions)
        return np.argsort(key, kind="stable")
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
