"""LLaVA-style layouts, budgets, collation and the kept-patch drawing, on small hand-made videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.dataset import Budget, cap_tokens, collate_tokens, make_sample, select_frames
from pipeline.reader import Frame, VideoTokens, View
from pipeline.render import KEPT_OUTLINE, PRUNED_SHADE, highlight
from pipeline.sequence import SequenceLayout, llava_sequence

C = 4


def view(tile: int, positions: list[int], scores: list[float]) -> View:
    """Token i of this view is filled with the value 100*tile + position, so rows identify themselves."""
    tokens = torch.tensor([[100 * tile + p] * C for p in positions], dtype=torch.float16).reshape(-1, C)
    return View(tile, tokens, torch.tensor(positions, dtype=torch.int16), torch.tensor(scores, dtype=torch.float32))


def frame(index: int, global_view: View, tiles=(), grid=(1, 1)) -> Frame:
    return Frame(index, index / 10, grid[0], grid[1], global_view, tuple(tiles))


def make_video(frames, patch_grid=(3, 3)) -> VideoTokens:
    return VideoTokens("v", "v.mp4", tuple(frames), metadata={"patch_grid": list(patch_grid), "hidden_size": C})


def test_video_frames_in_time_order_with_spatial_and_score_order():
    video = make_video([
        frame(0, view(-1, [1, 4, 7, -1], [0.1, 0.5, 0.3, 0.2])),
        frame(5, view(-1, [0, 8, -1], [0.2, 0.4, 0.9])),
    ])
    spatial = llava_sequence(video)
    assert spatial.position.tolist() == [1, 4, 7, -1, 0, 8, -1]
    assert spatial.frame.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert spatial.tokens[:, 0].tolist() == [-99, -96, -93, -101, -100, -92, -101]  # global view: p - 100
    assert not spatial.is_separator.any()
    assert spatial.timestamps_s.tolist() == [0.0, 0.5] and spatial.frame_index.tolist() == [0, 5]

    score = llava_sequence(video, SequenceLayout(order="score"))
    assert score.position.tolist() == [4, 7, 1, -1, 8, 0, -1]  # descending score, extra token last
    assert score.score.tolist() == pytest.approx([0.5, 0.3, 0.1, 0.2, 0.4, 0.2, 0.9])

    separated = llava_sequence(video, SequenceLayout(frame_separator=True))
    assert separated.is_separator.tolist() == [False] * 4 + [True] + [False] * 3 + [True]
    assert separated.frame.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.all(separated.tokens[separated.is_separator] == 0)
    assert separated.position[separated.is_separator].tolist() == [-1, -1]


def test_anyres_tiles_are_stitched_row_by_row_after_the_global_view():
    # 2x2 patches per view, tiles on a 1x2 grid: stitched grid is 2 rows x 4 columns.
    #   tile 0 | tile 1        stitched raster: row 0 = t0p0 t0p1 t1p0 t1p1, row 1 = t0p2 t0p3 t1p2 t1p3
    tiles = [view(0, [1, 2, -1], [0.1, 0.2, 0.3]), view(1, [0, 3, -1], [0.4, 0.5, 0.6])]
    video = make_video([frame(0, view(-1, [3, -1], [0.7, 0.8]), tiles, grid=(1, 2))], patch_grid=(2, 2))

    sequence = llava_sequence(video)
    tokens = sequence.tokens[:, 0].tolist()
    # global (pos 3, extra) | row 0: t0p1 t1p0 | newline | row 1: t0p2 t1p3 | newline | extras of t0, t1
    assert sequence.tile.tolist() == [-1, -1, 0, 1, -1, 0, 1, -1, 0, 1]
    assert sequence.position.tolist() == [3, -1, 1, 0, -1, 2, 3, -1, -1, -1]
    assert sequence.is_separator.tolist() == [False, False, False, False, True, False, False, True, False, False]
    assert tokens[2:4] == [1.0, 100.0] and tokens[4] == 0.0

    flat = llava_sequence(video, SequenceLayout(tile_row_newline=False))
    assert flat.position.tolist() == [3, -1, 1, 0, 2, 3, -1, -1]

    score = llava_sequence(video, SequenceLayout(order="score"))
    # global by score, then tile 0 then tile 1 (grid order) each by score, newline after the tile row
    assert score.position.tolist() == [3, -1, 2, 1, -1, 3, 0, -1, -1]
    assert score.is_separator.tolist()[-1]


def test_select_frames_is_uniform_and_keeps_the_ends():
    video = make_video([frame(i, view(-1, [0, -1], [0.5, 0.5])) for i in range(10)])
    assert [f.frame_index for f in select_frames(video, 4).frames] == [0, 3, 6, 9]
    assert select_frames(video, 20) is video


def test_cap_tokens_drops_the_lowest_scores_across_frames_and_keeps_order():
    video = make_video([
        frame(0, view(-1, [1, 4, 7, -1], [0.1, 0.5, 0.3, 0.2])),
        frame(1, view(-1, [0, 8, -1], [0.2, 0.4, 0.9])),
    ])
    capped = cap_tokens(video, 4)
    assert capped.num_tokens == 4
    assert [f.positions.tolist() for f in capped.frames] == [[4, 7], [8, -1]]
    assert capped.frames[0].tokens[:, 0].tolist() == [-96.0, -93.0]
    assert cap_tokens(video, 100) is video

    both = Budget(max_frames=1, max_tokens=1).apply(video)
    assert both.num_frames == 1 and both.frames[0].positions.tolist() == [4]
    with pytest.raises(ValueError):
        Budget(max_tokens=0)


def test_collate_pads_to_the_longest_and_masks():
    short = make_video([frame(0, view(-1, [2, -1], [0.5, 0.5]))])
    long = make_video([frame(0, view(-1, [1, 4, -1], [0.1, 0.5, 0.4])), frame(3, view(-1, [0, -1], [0.2, 0.8]))])
    layout = SequenceLayout(frame_separator=True)
    batch = collate_tokens([make_sample(short, Budget(), layout), make_sample(long, Budget(), layout)])
    assert batch["tokens"].shape == (2, 7, C) and batch["tokens"].dtype == torch.float16
    assert batch["lengths"].tolist() == [3, 7]
    assert batch["attention_mask"].tolist() == [[True] * 3 + [False] * 4, [True] * 7]
    assert torch.all(batch["tokens"][0, 3:] == 0)
    assert batch["position"][0].tolist() == [2, -1, -1, -1, -1, -1, -1]
    assert batch["frame"][0].tolist() == [0, 0, 0, -1, -1, -1, -1]
    assert batch["is_separator"][0].tolist() == [False, False, True, False, False, False, False]
    assert batch["frame_mask"].tolist() == [[True, False], [True, True]]
    assert batch["frame_index"].tolist() == [[0, -1], [0, 3]]
    assert torch.isnan(batch["timestamps_s"][0, 1])


def test_highlight_keeps_kept_patches_and_shades_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (42, 42, 3), dtype=np.uint8)  # 3x3 patches of 14 px
    out = highlight(image, np.array([4, -1]), (3, 3))
    assert np.array_equal(out[16:26, 16:26], image[16:26, 16:26])  # inside kept patch 4
    assert np.all(out[14, 14:28] == KEPT_OUTLINE) and np.all(out[14:28, 27] == KEPT_OUTLINE)
    pruned = (image[:14, :14] * np.array(PRUNED_SHADE)).astype(np.uint8)
    assert np.array_equal(out[:14, :14], pruned)


def test_highlight_takes_the_patch_size_when_the_view_is_not_whole_patches():
    """64 px in 14-px patches: a 4x4 grid whose patches start every 14 px (not 64 // 4 = 16); the 8 px past the
    last patch are never seen by the tower and are shaded."""
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    out = highlight(image, np.array([5, -1]), (4, 4), patch=14)  # patch 5: row 1, column 1 → pixels 14..27
    assert np.all(out[14, 14:28] == KEPT_OUTLINE) and np.all(out[14:28, 27] == KEPT_OUTLINE)
    assert np.array_equal(out[17:25, 17:25], image[17:25, 17:25])
    assert np.array_equal(out[56:], (image[56:] * np.array(PRUNED_SHADE)).astype(np.uint8))
