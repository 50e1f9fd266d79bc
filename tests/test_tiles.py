"""AnyRes tiling against a PIL transcription of LLaVA-NeXT's `process_anyres_image`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from operators.tiles import DEFAULT_PINPOINTS, anyres_decode_size, anyres_tiles, select_best_resolution
from media import decode_frame, video


def llava_anyres(image: Image.Image, pinpoints, tile: int) -> list[np.ndarray]:
    """LLaVA-NeXT's resize_and_pad_image + divide_to_patches, with the squashed global view first."""
    width, height = image.size
    best, best_effective, best_wasted = None, 0, math.inf
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_width, target_height), effective, wasted
    target_width, target_height = best
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(width * scale_h), target_width)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height), Image.BICUBIC),
                 ((target_width - new_width) // 2, (target_height - new_height) // 2))
    tiles = [np.asarray(image.resize((tile, tile), Image.BICUBIC))]
    for top in range(0, target_height, tile):
        for left in range(0, target_width, tile):
            tiles.append(np.asarray(canvas.crop((left, top, left + tile, top + tile))))
    return tiles


@pytest.mark.parametrize(
    "size, expected",
    [((1000, 500), (672, 336)), ((500, 1000), (336, 672)), ((800, 800), (672, 672)), ((1500, 400), (1008, 336)),
     # a 100x100 image fits whole in every grid: the first of the least wasteful wins
     ((300, 1200), (336, 1008)), ((100, 100), (336, 672))],
)
def test_best_resolution(size, expected):
    assert select_best_resolution(*size) == expected


@pytest.mark.parametrize("name", ["bt709_full_range.mp4", "video_90.mov", "flipping_a_pancake.mkv"])
def test_tiles_match_llava_next(name):
    frame = decode_frame(video(name))
    tiles = anyres_tiles(frame)
    expected = llava_anyres(Image.fromarray(frame), DEFAULT_PINPOINTS, 336)

    rows, cols = tiles.grid_rows, tiles.grid_cols
    assert tiles.pixels.shape == (1 + rows * cols, 336, 336, 3) and tiles.pixels.dtype == torch.uint8
    assert tiles.tile_index.tolist() == [-1] + list(range(rows * cols))
    assert len(expected) == 1 + rows * cols
    for ours, reference in zip(tiles.pixels.numpy(), expected):
        assert np.abs(ours.astype(float) - reference).mean() < 1.0  # grey levels; same bicubic family


def test_tiles_reassemble_into_the_padded_canvas():
    frame = decode_frame(video("bt709_full_range.mp4"))  # 1280 x 720
    tiles = anyres_tiles(frame)
    assert (tiles.grid_rows, tiles.grid_cols) == (2, 2)  # 672x672 keeps 672x378 px of a 16:9 frame, 672x336 only 597x336
    canvas = rearrange(tiles.pixels[1:], "(r c) h w ch -> (r h) (c w) ch", r=tiles.grid_rows)
    assert canvas.shape == (672, 672, 3)
    # 1280x720 fits 672x672 as 672x378, centred: black bars of 147 rows above and below
    assert canvas[:147].max() == 0 and canvas[-147:].max() == 0 and canvas[150:-150].float().mean() > 10


def test_frames_decoded_straight_to_the_tile_size_need_no_resize():
    name = "bt709_full_range.mp4"
    full = decode_frame(video(name))
    fit = anyres_decode_size(1280, 720)
    assert fit == (672, 378)
    small = decode_frame(video(name), 0, fit)
    from_full, from_decoder = anyres_tiles(full), anyres_tiles(small, source_size=(1280, 720))
    assert (from_full.grid_rows, from_full.grid_cols) == (from_decoder.grid_rows, from_decoder.grid_cols)
    assert (from_full.pixels.float() - from_decoder.pixels.float()).abs().mean() < 2.0
