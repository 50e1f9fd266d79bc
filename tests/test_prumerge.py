"""The vectorised PruMerge operator against the plain-loop reference, and its per-frame guarantees."""

from __future__ import annotations

import pytest
import torch

from operators.prumerge import add_spatial_samples, iqr_outliers, prumerge
from reference_prumerge import reference_prumerge

GRID = 8
N = GRID * GRID
C = 16
OUTLIER_COUNTS = [0, 1, 3, 7, 12]


def frames_with_outliers(counts: list[int], num_patches: int = N, width: int = C, seed: int = 0, scales=None):
    """Random features/keys and scores whose IQR outlier count per frame is exactly ``counts[i]``.

    Each frame's scores sum to ``scales[i]`` (default 1): frames on different scales make any
    statistic pooled over the batch select different tokens than the per-frame rule.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(counts)
    features = torch.randn(batch, num_patches, width, generator=generator)
    keys = torch.randn(batch, num_patches, width, generator=generator)
    # Uniform scores on [1, 2) have no IQR outliers; spikes far above them are the outliers.
    scores = 1 + torch.rand(batch, num_patches, generator=generator)
    for frame, count in enumerate(counts):
        spikes = torch.randperm(num_patches, generator=generator)[:count]
        scores[frame, spikes] = 10 + torch.rand(count, generator=generator)
    scales = torch.ones(batch) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
    return features, keys, scores / scores.sum(dim=1, keepdim=True) * scales[:, None]


def assert_matches_reference(result, reference, atol=1e-5, rtol=1e-5):
    assert len(result.tokens) == len(reference)
    for tokens, positions, scores, (ref_tokens, ref_positions, ref_scores) in zip(
        result.tokens, result.positions, result.scores, reference
    ):
        assert positions.tolist() == ref_positions
        torch.testing.assert_close(tokens.double(), ref_tokens, atol=atol, rtol=rtol)
        torch.testing.assert_close(scores.double(), torch.tensor(ref_scores, dtype=torch.float64), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
@pytest.mark.parametrize("k_neighbors", [1, 5, 32])
def test_adaptive_modes_match_reference(mode, k_neighbors):
    features, keys, scores = frames_with_outliers(OUTLIER_COUNTS)
    result = prumerge(features, keys, scores, mode=mode, k_neighbors=k_neighbors)
    assert_matches_reference(result, reference_prumerge(features, keys, scores, mode, k_neighbors=k_neighbors))


@pytest.mark.parametrize("budget", [1, 9, N])
def test_fixed_budget_matches_reference_and_keeps_exactly_budget(budget):
    features, keys, scores = frames_with_outliers(OUTLIER_COUNTS, seed=1)
    result = prumerge(features, keys, scores, mode="fixed", budget=budget)
    assert result.num_tokens == [budget + 1] * len(OUTLIER_COUNTS)
    assert_matches_reference(result, reference_prumerge(features, keys, scores, "fixed", budget=budget))


def test_prumerge_keeps_each_frames_own_outliers():
    features, keys, scores = frames_with_outliers(OUTLIER_COUNTS, scales=[1, 50, 0.1, 7, 1])
    result = prumerge(features, keys, scores, mode="prumerge")
    assert result.num_tokens == [count + 1 for count in OUTLIER_COUNTS]
    for frame, positions in enumerate(result.positions):
        kept = positions[:-1]
        assert kept.tolist() == sorted(kept.tolist()), "kept tokens must be in raster order"
        assert bool((scores[frame, kept] > 4 * scores[frame].median()).all()), "only the spikes are outliers here"
        assert positions[-1].item() == -1


def test_zero_outliers_gives_only_the_extra_token_for_both_adaptive_modes():
    features, keys, scores = frames_with_outliers([0, 0])
    for mode in ("prumerge", "prumerge+"):
        result = prumerge(features, keys, scores, mode=mode)
        assert result.num_tokens == [1, 1]
        for frame in range(2):
            expected = (scores[frame, :, None] * features[frame]).sum(dim=0)
            torch.testing.assert_close(result.tokens[frame][0], expected)
            assert result.positions[frame].tolist() == [-1]


def test_prumerge_plus_step_follows_the_published_rule():
    # One outlier of 64: ratio 1/64, step int(int(64)/3) = 21, samples 0, 21, 42 (range stops before N-1).
    kept = torch.zeros(2, N, dtype=torch.bool)
    kept[0, 5] = True
    kept[1, [0, 1, 2, 3, 4, 5, 6, 7]] = True  # ratio 1/8 -> step int(8/3) = 2
    augmented = add_spatial_samples(kept)
    assert augmented[0].nonzero().flatten().tolist() == [0, 5, 21, 42]
    assert augmented[1].nonzero().flatten().tolist() == sorted(set(range(8)) | set(range(0, N - 1, 2)))


def test_iqr_uses_linear_percentiles_per_frame():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [1.0, 2.0, 3.0, 4.0, 6.9]])
    # Q1 = 2, Q3 = 4, IQR = 2, bound = 7: 100 is an outlier, 6.9 is not.
    assert iqr_outliers(scores).tolist() == [[False, False, False, False, True], [False] * 5]


def test_frame_output_does_not_depend_on_its_batch():
    counts = [3] + [0, 1, 5, 9, 14, 2, 20, 7] * 4  # the probe frame, then 32 others
    scales = [4.0 ** (frame % 4) for frame in range(len(counts))]
    features, keys, scores = frames_with_outliers(counts, num_patches=576, width=64, seed=3, scales=scales)
    for mode, budget in (("prumerge", None), ("prumerge+", None), ("fixed", 50)):
        alone = prumerge(features[:1], keys[:1], scores[:1], mode=mode, budget=budget)
        batched = prumerge(features, keys, scores, mode=mode, budget=budget)
        assert batched.positions[0].tolist() == alone.positions[0].tolist()
        torch.testing.assert_close(batched.tokens[0], alone.tokens[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched.scores[0], alone.scores[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    features, keys, scores = frames_with_outliers(OUTLIER_COUNTS, seed=4)
    features, keys = features.to(dtype), keys.to(dtype)
    result = prumerge(features, keys, scores.to(dtype), mode="prumerge+")
    assert all(tokens.dtype == dtype for tokens in result.tokens)
    # The reference sees exactly the same half-precision values, upcast.
    reference = reference_prumerge(features, keys, scores.to(dtype), "prumerge+")
    assert_matches_reference(result, reference, atol=2e-2, rtol=1e-2)


def test_invalid_arguments_are_rejected():
    features, keys, scores = frames_with_outliers([1])
    with pytest.raises(ValueError, match="budget"):
        prumerge(features, keys, scores, mode="fixed")
    with pytest.raises(ValueError, match="budget"):
        prumerge(features, keys, scores, mode="fixed", budget=N + 1)
    with pytest.raises(ValueError, match="only used"):
        prumerge(features, keys, scores, mode="prumerge", budget=4)
    with pytest.raises(ValueError, match="mode"):
        prumerge(features, keys, scores, mode="topk")
    with pytest.raises(ValueError, match="expected"):
        prumerge(features, keys[:, :-1], scores)
