"""The vectorised HoliTom operator against the plain-loop reference, and its window and budget guarantees.

Token budget. With r the retention, T = F·N, R the total saving of the windows, S_w the static
positions of window w and L_f the non-static positions of frame f, the kept "mass" after the
temporal merge is T - R = Σ_w S_w + Σ_f L_f, so with r' = r·T / (T - R) < 1 the exact share is
r'·(T - R) = r·T. The output count is Σ_w round(S_w·r') + Σ_f ceil(L_f·r') (dominant plus
contextual add up to exactly the ceil). Counts are computed in exact rational arithmetic, so
|round(y) - y| <= 1/2 and 0 <= ceil(y) - y < 1 hold exactly, and with W the number of windows of
two or more frames (one-frame windows have no static positions):

    r·F·N - W/2  <=  count  <  r·F·N + W/2 + F.

When r' is capped at 1 everything left after the temporal merge is kept: count = T - R (>= r·T).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from operators.holitom import dpc_knn_merge, holitom, static_windows
from reference_holitom import holitom as reference_holitom
from reference_holitom import static_windows as reference_static_windows


def moving_clip(frames: int, grid: int, width: int, seed: int, change: float = 0.3, cut: int | None = None):
    """Features ``[F, N, C]`` where each patch drifts slightly from frame to frame and, with probability
    ``change``, is replaced by a fresh random vector; ``cut`` replaces every patch at that frame.
    Importance ``[F, N]`` uniform on [0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    num_patches = grid * grid
    features = torch.empty(frames, num_patches, width)
    features[0] = torch.randn(num_patches, width, generator=generator)
    for t in range(1, frames):
        drifted = features[t - 1] + 0.1 * torch.randn(num_patches, width, generator=generator)
        fresh = torch.randn(num_patches, width, generator=generator)
        replaced = torch.rand(num_patches, generator=generator) < (1.0 if t == cut else change)
        features[t] = torch.where(replaced[:, None], fresh, drifted)
    importance = torch.rand(frames, num_patches, generator=generator)
    return features, importance


def scene_cut_clip(frames: int, cut: int, grid: int = 4, width: int = 16, seed: int = 0):
    """Frames 0..cut-1 one random image plus tiny noise, frames cut.. another."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, grid * grid, width, generator=generator)
    base = torch.stack([first if t < cut else second for t in range(frames)])
    features = base + 1e-3 * torch.randn(base.shape, generator=generator)
    return features, torch.rand(frames, grid * grid, generator=generator)


def token_count(windows) -> int:
    return sum(window.num_tokens for window in windows)


def assert_matches_reference(result, reference):
    assert [(w.start, w.end) for w in result] == [(w.start, w.end) for w in reference]
    for window, expected in zip(result, reference):
        assert window.positions.tolist() == expected.positions
        assert window.first_frame.tolist() == expected.first_frame
        assert window.last_frame.tolist() == expected.last_frame
        assert window.positions.dtype == window.first_frame.dtype == window.last_frame.dtype == torch.int64
        assert window.scores.dtype == torch.float32
        torch.testing.assert_close(window.tokens.double(), expected.tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            window.scores.double(), torch.tensor(expected.scores, dtype=torch.float64), atol=1e-6, rtol=0
        )


# (frames, grid, width, retention, keyword arguments, seed)
CASES = [
    (1, 1, 4, 1.0, {}, 0),
    (1, 2, 8, 0.5, {}, 1),
    (1, 3, 8, 0.3, {"contextual_share": 0.5}, 2),
    (2, 2, 4, 0.25, {"contextual_share": 1.0}, 3),
    (4, 3, 8, 0.3, {"contextual_share": 0.5}, 4),
    (6, 4, 16, 0.2, {}, 5),
    (8, 4, 12, 0.1, {"contextual_share": 1.0, "max_window": 3}, 6),
    (5, 5, 8, 1.0, {"contextual_share": 0.5}, 7),
    (7, 6, 16, 0.25, {"contextual_share": 0.3, "tau": 0.5, "k_density": 3, "beta": 0.3}, 8),
    (3, 2, 4, 0.7, {"tau": 0.0, "contextual_share": 0.6}, 9),
    (5, 3, 8, 0.4, {"tau": 1.0, "contextual_share": 0.5}, 10),
    (9, 4, 8, 0.15, {"contextual_share": 0.5, "max_window": 4, "k_density": 2}, 11),
    (6, 3, 6, 0.5, {"contextual_share": 0.25, "max_window": 1}, 12),
]


@pytest.mark.parametrize("frames, grid, width, retention, kwargs, seed", CASES)
def test_matches_reference(frames, grid, width, retention, kwargs, seed):
    features, importance = moving_clip(frames, grid, width, seed, cut=frames // 2 if frames > 3 else None)
    result = holitom(features, importance, retention, **kwargs)
    assert_matches_reference(result, reference_holitom(features, importance, retention, **kwargs))


def test_matches_reference_with_tied_importance():
    # Importance in {0, 1, 2}: the dominant top-k must break ties by the lowest position.
    features, _ = moving_clip(5, 4, 8, seed=20)
    importance = torch.randint(0, 3, (5, 16), generator=torch.Generator().manual_seed(21)).float()
    for share in (0.0, 0.5):
        result = holitom(features, importance, 0.3, contextual_share=share)
        assert_matches_reference(result, reference_holitom(features, importance, 0.3, contextual_share=share))


@pytest.mark.parametrize("tau, max_window", [(0.8, None), (0.5, 3), (0.95, None), (0.0, 2)])
def test_static_windows_match_reference(tau, max_window):
    for seed in range(4):
        features, _ = moving_clip(10, 3, 8, seed=30 + seed, change=0.2, cut=6)
        windows, saving = static_windows(features, tau, max_window)
        expected_windows, expected_saving, _ = reference_static_windows(features, tau, max_window)
        assert windows == expected_windows and saving == expected_saving
        assert windows[0][0] == 0 and windows[-1][1] == 9
        assert all(end + 1 == next_start for (_, end), (next_start, _) in zip(windows, windows[1:]))
        assert all(end - start + 1 <= (max_window or 10) for start, end in windows)


def test_a_longer_window_is_taken_only_when_strictly_better():
    # Patches 0, 1 unchanged over frames 0..2, patches 2, 3 only over 0..1:
    # [0,1]+[2] and [0,2] both save 4; the shorter last window wins.
    still, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frame = torch.stack([still] * 4)
    features = torch.stack([frame, frame, torch.stack([still, still, other, other])])
    assert static_windows(features, tau=0.8) == ([(0, 1), (2, 2)], 4)
    features[2, 2:] = still  # now [0,2] saves 8 > 4
    assert static_windows(features, tau=0.8) == ([(0, 2)], 8)


def test_fully_static_clip_is_one_window_covering_all_frames():
    frames, grid, retention = 8, 4, 0.1
    image = torch.randn(grid * grid, 16, generator=torch.Generator().manual_seed(40))
    features = image.expand(frames, -1, -1).clone()
    importance = torch.rand(frames, grid * grid, generator=torch.Generator().manual_seed(41))
    assert static_windows(features) == ([(0, frames - 1)], grid * grid * (frames - 1))
    (window,) = holitom(features, importance, retention)
    assert (window.start, window.end) == (0, frames - 1)
    # r' = min(r·F, 1) = 0.8: round(16·0.8) = 13 static tokens and nothing dynamic.
    assert window.num_tokens == 13
    assert window.first_frame.tolist() == [0] * 13 and window.last_frame.tolist() == [frames - 1] * 13
    assert_matches_reference([window], reference_holitom(features, importance, retention))
    # tau = 1: nothing counts as static, even identical frames (similarity is clamped at 1).
    windows = holitom(features, importance, retention, tau=1.0)
    assert [(w.start, w.end) for w in windows] == [(t, t) for t in range(frames)]


def test_a_window_keeps_a_token_however_small_the_retention():
    """A fully static window at a retention whose static share rounds to nothing keeps one token (the
    public code would leave the whole window, here the whole clip, without any)."""
    frames, grid = 10, 4
    image = torch.randn(grid * grid, 16, generator=torch.Generator().manual_seed(42))
    features = image.expand(frames, -1, -1).clone()
    importance = torch.rand(frames, grid * grid, generator=torch.Generator().manual_seed(43))
    (window,) = holitom(features, importance, 1e-9)
    assert window.num_tokens == 1 and (window.first_frame.item(), window.last_frame.item()) == (0, frames - 1)
    assert_matches_reference([window], reference_holitom(features, importance, 1e-9))


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_scene_cut_splits_the_windows_exactly_at_the_cut(cut):
    frames = 10
    features, importance = scene_cut_clip(frames, cut, seed=cut)
    expected = [(0, cut - 1), (cut, frames - 1)]
    assert static_windows(features)[0] == expected
    windows = holitom(features, importance, 0.2, contextual_share=0.5)
    assert [(w.start, w.end) for w in windows] == expected
    for window in windows:
        if window.end > window.start:  # all 16 positions static: every token spans the whole window
            assert window.first_frame.tolist() == [window.start] * window.num_tokens
            assert window.last_frame.tolist() == [window.end] * window.num_tokens


def test_nothing_static_gives_one_window_per_frame():
    frames, grid = 6, 3
    features = torch.randn(frames, grid * grid, 64, generator=torch.Generator().manual_seed(50))
    importance = torch.rand(frames, grid * grid, generator=torch.Generator().manual_seed(51))
    assert static_windows(features) == ([(t, t) for t in range(frames)], 0)
    windows = holitom(features, importance, 0.3, contextual_share=0.5)
    assert [(w.start, w.end) for w in windows] == [(t, t) for t in range(frames)]
    for t, window in enumerate(windows):
        assert window.num_tokens == 3  # ceil(9·0.3)
        assert window.first_frame.tolist() == window.last_frame.tolist() == [t] * 3


BUDGET_CASES = [
    (frames, grid, retention, share, max_window, seed)
    for seed, (frames, grid, retention, share, max_window) in enumerate(
        [
            (1, 4, 0.1, 0.0, None),
            (1, 5, 0.37, 0.5, None),
            (4, 4, 0.1, 0.0, None),
            (8, 4, 0.15, 0.5, None),
            (8, 5, 0.05, 1.0, 2),
            (12, 4, 0.2, 0.3, 5),
            (10, 3, 0.33, 0.5, None),
            (16, 6, 0.1, 0.0, None),
            (6, 4, 0.9, 0.5, None),
            (5, 3, 1.0, 0.5, None),
        ]
    )
]


@pytest.mark.parametrize("frames, grid, retention, share, max_window, seed", BUDGET_CASES)
def test_token_count_meets_the_retention(frames, grid, retention, share, max_window, seed):
    features, importance = moving_clip(frames, grid, 8, seed=60 + seed, change=0.25)
    num_patches = grid * grid
    windows = holitom(features, importance, retention, contextual_share=share, max_window=max_window)
    _, saving = static_windows(features, max_window=max_window)
    count = token_count(windows)
    total = frames * num_patches
    target = Fraction(str(retention)) * total
    multi_frame = sum(1 for w in windows if w.end > w.start)
    if target >= total - saving:  # r' capped at 1: everything left after the temporal merge is kept
        assert count == total - saving
    else:
        assert target - Fraction(multi_frame, 2) <= count < target + Fraction(multi_frame, 2) + frames


def test_single_cluster_ties_go_to_the_lowest_index():
    # keep = 1, all contextual: k = 1 makes every density exp(0) = 1, so every score ties and the
    # centre is token 0; the other three join it.
    features = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(70))
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    (window,) = holitom(features, importance, 0.25, contextual_share=1.0, beta=0.6)
    assert window.positions.tolist() == [0]
    expected = 0.6 * features[0, 0] + 0.4 * features[0, 1:].mean(dim=0)
    torch.testing.assert_close(window.tokens[0], expected)
    assert window.scores.tolist() == [pytest.approx(0.1)]
    centres, merged = dpc_knn_merge(features[0][None], 4, 7, 0.6)  # as many centres as tokens
    assert centres.tolist() == [[0, 1, 2, 3]] and torch.equal(merged, features[0][None])


def test_deterministic_across_calls():
    features, importance = moving_clip(8, 5, 16, seed=80, cut=3)
    first = holitom(features, importance, 0.2, contextual_share=0.5)
    second = holitom(features, importance, 0.2, contextual_share=0.5)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert (a.start, a.end) == (b.start, b.end)
        for name in ("tokens", "positions", "first_frame", "last_frame", "scores"):
            assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    features, importance = moving_clip(6, 4, 16, seed=90, cut=3)
    features = features.to(dtype)
    windows = holitom(features, importance, 0.2, contextual_share=0.5)
    upcast = holitom(features.float(), importance, 0.2, contextual_share=0.5)
    for window, expected in zip(windows, upcast, strict=True):
        assert window.tokens.dtype == dtype and window.scores.dtype == torch.float32
        assert torch.equal(window.positions, expected.positions)
        assert torch.equal(window.tokens, expected.tokens.to(dtype))


def test_invalid_arguments_are_rejected():
    features, importance = moving_clip(3, 2, 4, seed=100)
    for retention in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="retention"):
            holitom(features, importance, retention)
    for tau in (-0.1, 1.1):
        with pytest.raises(ValueError, match="tau"):
            holitom(features, importance, 0.5, tau=tau)
        with pytest.raises(ValueError, match="tau"):
            static_windows(features, tau)
    for share in (-0.5, 1.5):
        with pytest.raises(ValueError, match="contextual_share"):
            holitom(features, importance, 0.5, contextual_share=share)
    with pytest.raises(ValueError, match="beta"):
        holitom(features, importance, 0.5, beta=1.2)
    with pytest.raises(ValueError, match="k_density"):
        holitom(features, importance, 0.5, k_density=0)
    with pytest.raises(ValueError, match="max_window"):
        holitom(features, importance, 0.5, max_window=0)
    with pytest.raises(ValueError, match="importance"):
        holitom(features, importance[:, :-1], 0.5)
    with pytest.raises(ValueError, match="importance"):
        holitom(features, -importance, 0.5)
    with pytest.raises(ValueError, match="expected"):
        holitom(features[0], importance[0], 0.5)
    with pytest.raises(ValueError, match="square"):
        holitom(torch.randn(3, 5, 4), torch.rand(3, 5), 0.5)  # 4 patches + a CLS token
    with pytest.raises(ValueError, match="expected"):
        holitom(features[:0], importance[:0], 0.5)
