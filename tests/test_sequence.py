"""LLaVA-style layouts, budgets, collation and the kept-patch drawing, on small hand-made videos."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.dataset import Budget, cap_tokens, collate_tokens, make_sample, select_frames
from pipeline.reader import Frame, VideoTokens, View
from pipeline.render import KEPT_OUTLINE, PRUNED_SHADE, SPANNING_OUTLINE, highlight
from pipeline.sequence import SequenceLayout, llava_sequence

C = 4


def view(tile: int, positions: list[int], scores: list[float]) -> View:
    """Token i of this view is filled with the value 100*tile + position, so rows identify themselves."""
    tokens = torch.tensor([[100 * tile + p] * C for p in positions], dtype=torch.float16).reshape(-1, C)
    unset = torch.full((len(positions),), -1, dtype=torch.int32)  # `frame` sets the frame's number
    return View(tile, tokens, torch.tensor(positions, dtype=torch.int16), torch.tensor(scores, dtype=torch.float32),
                unset, unset)


def frame(index: int, global_view: View, tiles=(), grid=(1, 1)) -> Frame:
    def own(v: View) -> View:
        number = torch.full((v.num_tokens,), index, dtype=torch.int32)
        return dataclasses.replace(v, first_frames=number, last_frames=number)

    return Frame(index, index / 10, grid[0], grid[1], own(global_view), tuple(own(t) for t in tiles))


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


# -- temporal outputs (holitom): a row is a window of source frames ----------------------------------------


def window(frames: list[int], tokens: list[tuple[int, int, int, float]]) -> Frame:
    """A row standing for source ``frames`` (times frame/10) with ``tokens`` (first, last, position, score),
    each filled with 10*first + position, stored sorted by (first, position) as the writer stores them."""
    tokens = sorted(tokens, key=lambda t: (t[0], t[2]))
    first, last, positions, scores = (list(column) for column in zip(*tokens))
    values = torch.tensor([[10 * f + p] * C for f, p in zip(first, positions)], dtype=torch.float16)
    v = View(-1, values, torch.tensor(positions, dtype=torch.int16), torch.tensor(scores, dtype=torch.float32),
             torch.tensor(first, dtype=torch.int32), torch.tensor(last, dtype=torch.int32))
    return Frame(frames[0], frames[0] / 10, 1, 1, v, frame_indices=tuple(frames),
                 timestamps=tuple(f / 10 for f in frames))


def temporal_video() -> VideoTokens:
    """Window 10-12 with static positions 2 and 5 (one token each for the three frames), frame 10's own
    tokens 0 and 7, frame 11's 3, none of frame 12's; then frame 13 alone with 1 and 4."""
    return make_video([
        window([10, 11, 12], [(10, 12, 2, 0.9), (10, 12, 5, 0.1), (10, 10, 0, 0.5), (10, 10, 7, 0.6),
                              (11, 11, 3, 0.2)]),
        window([13], [(13, 13, 1, 0.3), (13, 13, 4, 0.4)]),
    ])


def test_temporal_sequence_runs_over_source_frames_in_holitom_order():
    video = temporal_video()
    sequence = llava_sequence(video, SequenceLayout(frame_separator=True))
    # static tokens sit with the window's first frame, among its own tokens by position; a separator per
    # source frame, also after frame 12, which holds no token of its own
    assert sequence.position.tolist() == [0, 2, 5, 7, -1, 3, -1, -1, 1, 4, -1]
    assert sequence.is_separator.tolist() == [False] * 4 + [True, False, True, True, False, False, True]
    assert sequence.frame.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3]
    assert sequence.last_frame.tolist() == [0, 2, 2, 0, 0, 1, 1, 2, 3, 3, 3]
    assert sequence.tile.tolist() == [-1] * 11
    assert sequence.tokens[:, 0].tolist() == [100, 102, 105, 107, 0, 113, 0, 0, 131, 134, 0]
    assert sequence.frame_index.tolist() == [10, 11, 12, 13]
    assert sequence.timestamps_s.tolist() == pytest.approx([1.0, 1.1, 1.2, 1.3])
    assert sequence.score.tolist() == pytest.approx([0.5, 0.9, 0.1, 0.6, 0, 0.2, 0, 0, 0.3, 0.4, 0])

    plain = llava_sequence(video)
    assert plain.position.tolist() == [0, 2, 5, 7, 3, 1, 4] and not plain.is_separator.any()
    assert plain.frame.tolist() == [0, 0, 0, 0, 1, 3, 3] and plain.last_frame.tolist() == [0, 2, 2, 0, 1, 3, 3]

    score = llava_sequence(video, SequenceLayout(order="score"))  # each source frame's tokens by score
    assert score.position.tolist() == [2, 7, 0, 5, 3, 4, 1]
    assert score.frame.tolist() == [0, 0, 0, 0, 1, 3, 3]


def test_per_frame_sequences_have_last_frame_equal_to_frame():
    video = make_video([frame(0, view(-1, [1, -1], [0.1, 0.2])), frame(5, view(-1, [0], [0.2]))])
    sequence = llava_sequence(video, SequenceLayout(frame_separator=True))
    assert torch.equal(sequence.last_frame, sequence.frame)
    assert sequence.frame.tolist() == [0, 0, 0, 1, 1]


def test_temporal_rows_that_contradict_themselves_are_refused():
    bad_span = window([10, 11], [(10, 12, 2, 0.9)])  # stands for frame 12, the row covers 10-11
    with pytest.raises(ValueError, match=r"tokens stand for frames \[10, 12\].*covers \[10, 11\]"):
        llava_sequence(make_video([bad_span]))
    backwards = window([10, 11], [(11, 10, 2, 0.9)])
    with pytest.raises(ValueError, match="first <= last"):
        llava_sequence(make_video([backwards]))
    twice = [window([10, 11], [(10, 11, 2, 0.9)]), window([11], [(11, 11, 0, 0.1)])]
    with pytest.raises(ValueError, match="cover a source frame twice"):
        llava_sequence(make_video(twice))
    tiled = window([10, 11], [(10, 11, 2, 0.9)])
    tiled = dataclasses.replace(tiled, tiles=(tiled.global_view,), grid_rows=1, grid_cols=1)
    with pytest.raises(ValueError, match="holds one view"):
        llava_sequence(make_video([tiled]))


def spans(video: VideoTokens) -> list[tuple[tuple[int, ...], list[tuple[int, int, int]]]]:
    """Per row: its frames, and its tokens as (first, last, position)."""
    return [(f.frame_indices, list(zip(f.global_view.first_frames.tolist(), f.global_view.last_frames.tolist(),
                                       f.positions.tolist()))) for f in video.frames]


def test_select_frames_on_windows_cuts_them_to_the_uniformly_kept_source_frames():
    video = temporal_video()  # source frames 10, 11, 12, 13
    assert select_frames(video, 4) is video
    # uniform over the 4 source frames: 10, 11, 13; the window keeps 10-11, its static tokens now span 10-11
    three = select_frames(video, 3)
    assert spans(three) == [((10, 11), [(10, 10, 0), (10, 11, 2), (10, 11, 5), (10, 10, 7), (11, 11, 3)]),
                            ((13,), [(13, 13, 1), (13, 13, 4)])]
    assert three.frames[0].timestamps == (1.0, 1.1) and three.frames[0].frame_index == 10
    assert three.frames[0].tokens[:, 0].tolist() == [100, 102, 105, 107, 113]
    # 10 and 13: frame 11's own token goes, the static tokens stand for frame 10 alone
    two = select_frames(video, 2)
    assert spans(two) == [((10,), [(10, 10, 0), (10, 10, 2), (10, 10, 5), (10, 10, 7)]),
                          ((13,), [(13, 13, 1), (13, 13, 4)])]
    assert llava_sequence(two, SequenceLayout(frame_separator=True)).frame_index.tolist() == [10, 13]

    # a window whose first frame is not kept: its static tokens move to the first kept frame
    late = make_video([window([8], [(8, 8, 0, 0.5)]),
                       window([9, 10, 11, 12], [(9, 12, 2, 0.9), (9, 9, 1, 0.3), (12, 12, 4, 0.2)])])
    cut = select_frames(late, 2)  # source frames 8 and 12
    assert spans(cut) == [((8,), [(8, 8, 0)]), ((12,), [(12, 12, 2), (12, 12, 4)])]
    assert cut.frames[1].frame_index == 12 and cut.frames[1].timestamp_s == pytest.approx(1.2)
    sequence = llava_sequence(cut, SequenceLayout(frame_separator=True))
    assert sequence.position.tolist() == [0, -1, 2, 4, -1] and sequence.frame_index.tolist() == [8, 12]

    # a fully static clip is one window longer than the budget: still at most max_frames frames
    still = make_video([window(list(range(8)), [(0, 7, p, 0.5) for p in range(4)] + [(3, 3, 5, 0.1)])])
    one = select_frames(still, 3)  # frames 0, 3, 7
    assert spans(one) == [((0, 3, 7), [(0, 7, 0), (0, 7, 1), (0, 7, 2), (0, 7, 3), (3, 3, 5)])]


def test_budgets_and_collation_carry_the_last_frame():
    video = temporal_video()
    capped = cap_tokens(video, 3)  # the three best scores: static 2 (0.9), 7 (0.6), 0 (0.5)
    assert spans(capped) == [((10, 11, 12), [(10, 10, 0), (10, 12, 2), (10, 10, 7)]), ((13,), [])]
    layout = SequenceLayout(frame_separator=True)
    per_frame = make_video([frame(0, view(-1, [2, -1], [0.5, 0.5]))])
    batch = collate_tokens([make_sample(per_frame, Budget(), layout), make_sample(video, Budget(max_frames=3), layout)])
    assert batch["last_frame"].shape == batch["frame"].shape == (2, 10)
    assert batch["last_frame"][0].tolist() == [0, 0, 0] + [-1] * 7
    # frames 10, 11, 13: 0 2 5 7 | 3 | 1 4 |, the static tokens reaching frame 11 (ordinal 1)
    assert batch["position"][1].tolist() == [0, 2, 5, 7, -1, 3, -1, 1, 4, -1]
    assert batch["last_frame"][1].tolist() == [0, 1, 1, 0, 0, 1, 1, 2, 2, 2]
    assert batch["frame_index"].tolist() == [[0, -1, -1], [10, 11, 13]]
    assert batch["frame_mask"].tolist() == [[True, False, False], [True, True, True]]


def test_highlight_outlines_spanning_tokens_in_their_own_colour():
    image = np.full((42, 42, 3), 100, dtype=np.uint8)  # 3x3 patches of 14 px
    out = highlight(image, np.array([0]), (3, 3), spanning=np.array([4, 8]))
    assert np.all(out[0, 0:14] == KEPT_OUTLINE)
    for p in (4, 8):
        r, c = divmod(p, 3)
        assert np.all(out[14 * r, 14 * c:14 * c + 14] == SPANNING_OUTLINE)
        assert np.all(out[14 * r + 5:14 * r + 9, 14 * c + 5:14 * c + 9] == 100)  # inside: the picture itself
    assert np.array_equal(out[14:28, :14], (image[14:28, :14] * np.array(PRUNED_SHADE)).astype(np.uint8))
