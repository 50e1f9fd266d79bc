"""LLaVA-NeXT "AnyRes": a global view plus S×S tiles of the image resized and padded into the best grid.

Follows LLaVA-NeXT's `process_anyres_image`: pick the pinpoint resolution that keeps the most of
the image's pixels (ties: the least padding), resize the image to fit it keeping the aspect ratio,
centre it on a black canvas, cut the canvas into S×S tiles in row-major order, and put one view of
the whole image squashed to S×S first. Works on images and on video frames alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from operators.preprocess import resize_uint8

# llava-v1.6's grid pinpoints, in tiles (columns, rows): for 336-px towers 336x672, 672x336, 672x672, 1008x336, 336x1008.
DEFAULT_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(tile_size: int) -> tuple[tuple[int, int], ...]:
    """llava-v1.6's grid pinpoints for a tower whose input is ``tile_size`` px, as (width, height) px."""
    return tuple((cols * tile_size, rows * tile_size) for cols, rows in DEFAULT_GRIDS)


DEFAULT_PINPOINTS = default_pinpoints(336)
GLOBAL_VIEW = -1


@dataclass(frozen=True)
class Tiles:
    """One image's AnyRes views: the global view first, then the grid's tiles in row-major order."""

    pixels: torch.Tensor  # [1 + rows*cols, S, S, 3] uint8
    tile_index: np.ndarray  # [1 + rows*cols] int16: -1 for the global view, then 0..rows*cols-1
    grid_rows: int
    grid_cols: int


def select_best_resolution(width: int, height: int, pinpoints=DEFAULT_PINPOINTS) -> tuple[int, int]:
    """The (width, height) pinpoint that keeps the most effective pixels, then wastes the fewest."""
    best, best_effective, best_wasted = None, -1, math.inf
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_width, target_height), effective, wasted
    return best


def fit_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(width, height) that fits ``target`` keeping the aspect ratio (LLaVA-NeXT's `resize_and_pad_image`)."""
    target_width, target_height = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return target_width, min(math.ceil(height * scale_w), target_height)
    return min(math.ceil(width * scale_h), target_width), target_height


def anyres_decode_size(width: int, height: int, pinpoints=DEFAULT_PINPOINTS) -> tuple[int, int]:
    """The size to decode a ``width``×``height`` frame to, so that tiling needs no further resize."""
    return fit_size(width, height, select_best_resolution(width, height, pinpoints))


def anyres_tiles(
    image: np.ndarray | torch.Tensor,
    tile_size: int = 336,
    pinpoints=DEFAULT_PINPOINTS,
    source_size: tuple[int, int] | None = None,
) -> Tiles:
    """Split ``image [H, W, 3]`` uint8 into its global view and AnyRes tiles.

    ``source_size`` is the (width, height) the image had before the decoder shrank it to
    `anyres_decode_size`; the grid is chosen from it. Default: the image's own size.
    """
    pixels = torch.as_tensor(image)[None]  # [1, H, W, 3]
    height, width = pixels.shape[1:3]
    source_width, source_height = source_size if source_size is not None else (width, height)
    grid_width, grid_height = select_best_resolution(source_width, source_height, pinpoints)
    fit_width, fit_height = fit_size(source_width, source_height, (grid_width, grid_height))

    fitted = resize_uint8(pixels, fit_width, fit_height)[0]  # [h, w, 3]
    canvas = torch.zeros(grid_height, grid_width, 3, dtype=torch.uint8)
    top, left = (grid_height - fit_height) // 2, (grid_width - fit_width) // 2
    canvas[top : top + fit_height, left : left + fit_width] = fitted
    tiles = rearrange(canvas, "(rows s1) (cols s2) c -> (rows cols) s1 s2 c", s1=tile_size, s2=tile_size)
    global_view = resize_uint8(pixels, tile_size, tile_size)  # [1, S, S, 3]

    rows, cols = grid_height // tile_size, grid_width // tile_size
    return Tiles(
        pixels=torch.cat([global_view, tiles]),
        tile_index=np.arange(-1, rows * cols, dtype=np.int16),
        grid_rows=rows,
        grid_cols=cols,
    )
