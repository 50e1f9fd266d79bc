"""HoliTom's outer-LLM stage (arXiv 2505.21334): global temporal windows, then spatial merging.

One call reduces one segment of a video: ``features [F, N, C]``, the tower's patch features of F
consecutive sampled frames (N patches on a square grid, no CLS), with ``importance [F, N]``.
Everything runs in float32 on the input's device; tokens come back in the input dtype.

Semantics, with r the requested ``retention``:
1. Similarity: sim[t, p] = cosine similarity of patch p in frames t and t+1 (clamped to at most 1),
   on ``features`` themselves. The public code measures it on the projected, 2x2-pooled features
   that it feeds the LLM; this operator works on the tower's full grid.
2. Static positions of a window [s, e], e > s: the p with sim[t, p] > tau for every t in s..e-1.
   The window saves (#static positions)·(e - s) tokens; a one-frame window saves nothing.
3. Windows: the partition of 0..F-1 into windows of at most ``max_window`` frames (None: F) with
   the largest total saving, by dynamic programming over the last frame i: a frame alone first,
   then windows ending at i from 2 frames upwards, each taken only when strictly better than the
   best so far (the public code's tie rule). A clip with nothing static is all one-frame windows;
   a fully static clip is one window.
4. Adjusted ratio r' = min(r·F·N / (F·N - total saving), 1): the static merge of step 2 counts
   towards the budget. r (and ``contextual_share``) are read as the decimals they print as
   (0.1 is 1/10) and every count below is computed in exact rational arithmetic, so no float
   rounding moves a ceil or a round by one.
5. Static tokens of a window with S static positions: the mean of each static position over the
   window's frames, reduced by DPC-kNN (below) to round(S·r') tokens (Python's round: halves to
   even), at least one when every position of the window is static (the public code can leave such a
   window without any token at a small r; a window here always keeps one). Score: the centre position's importance averaged over the window's frames.
   first_frame = s, last_frame = e.
6. Dynamic tokens, per frame of the window (its L non-static positions; a one-frame window: all N):
   keep = ceil(L·r'); dominant = round(keep·(1 - contextual_share)) tokens of highest importance
   are kept as they are; the frame's other L - dominant tokens are reduced by DPC-kNN to
   contextual = keep - dominant tokens. Score: the importance at the token's position in that
   frame. first_frame = last_frame = the frame.
7. DPC-kNN of n tokens into m centres: distance d = Euclidean / sqrt(C); density
   rho_i = exp(-mean of d² over the k = min(k_density, m) nearest tokens, i itself included);
   delta_i = distance to the nearest token of strictly higher density, or for a token with none
   the largest distance between any two of the n tokens; the centres are the m largest
   delta·rho. Every other token joins its nearest centre, and a centre becomes
   beta·centre + (1 - beta)·mean(its members) (unchanged when it has none); its position is the
   centre's. No random noise is added (the public code adds up to 1e-6 to rho): every tie, in a
   top-m or an argmin, goes to the lowest index.
Within a window, tokens are ordered by (first_frame, position): the static tokens sit with the
window's first frame, as in the order HoliTom feeds the LLM (its "grid" layout).

Other departures from the public code: its contextual branch (D > 0) cannot run (its position
bookkeeping broadcasts [W, L] against [W, L, 1] and fails), so rule 6 follows the method's
description there; distances use the exact difference kernel rather than the Gram-matrix one
(whose float32 cancellation errors were measured at ~5e-4 relative on random C = 1152
features), which also gives an exact zero diagonal.

Vectorised: the similarity, the static-run table and the savings are tensor ops over the whole
segment; the dynamic programming loops over frames on a small table of Python ints; each window's
frames share L, so one batched DPC-kNN per window serves all of its frames. No Python loop over
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


@dataclass(frozen=True)
class WindowTokens:
    """The reduced tokens of one temporal window [start, end] of a segment."""

    start: int  # first frame of the window, index into the segment's frames (0-based)
    end: int  # last frame, inclusive
    tokens: torch.Tensor  # [M, C], the features' dtype
    positions: torch.Tensor  # [M] int64 row-major patch index (a merged token: its cluster centre's)
    first_frame: torch.Tensor  # [M] int64 segment frame index of the first frame the token stands for
    last_frame: torch.Tensor  # [M] int64 ... the last (static tokens: start..end; others: their own frame)
    scores: torch.Tensor  # [M] float32 importance of each output token

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


def consecutive_similarity(features: torch.Tensor) -> torch.Tensor:
    """``[F-1, N]`` float32 cosine similarity of each patch in frame t and frame t+1, at most 1."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1, eps=1e-12)
    return (unit[:-1] * unit[1:]).sum(dim=-1).clamp(max=1.0)


def static_reach(features: torch.Tensor, tau: float) -> torch.Tensor:
    """``[F, N]`` int64: the last frame e such that patch p stays static over [s, e] (s itself at least).

    Patch p is static over [s, e] exactly when ``reach[s, p] >= e``.
    """
    num_frames, num_patches = features.shape[:2]
    above = consecutive_similarity(features) > tau  # [F-1, N]
    last = num_frames - 1
    pair = torch.arange(last, device=features.device)[:, None]
    # The first broken pair t >= s ends the run at frame t; an unbroken run reaches the last frame.
    breaks = torch.where(above, torch.full_like(pair, last), pair)  # [F-1, N]
    breaks = torch.cat([breaks, torch.full((1, num_patches), last, device=features.device, dtype=torch.long)])
    return torch.flip(torch.cummin(torch.flip(breaks, [0]), dim=0).values, [0])


def window_savings(reach: torch.Tensor) -> torch.Tensor:
    """``[F, F]`` int64: saving[s, e] = (#patches static over [s, e])·(e - s), 0 unless e > s."""
    num_frames = reach.shape[0]
    histogram = torch.zeros(num_frames, num_frames, dtype=torch.long, device=reach.device)
    histogram.scatter_add_(1, reach, torch.ones_like(reach))  # [s, v]: patches whose run from s ends at v
    static_count = torch.flip(torch.cumsum(torch.flip(histogram, [1]), dim=1), [1])  # [s, e]: runs reaching e
    frames = torch.arange(num_frames, device=reach.device)
    length = (frames[None, :] - frames[:, None]).clamp(min=0)  # e - s
    return static_count * length


def partition(savings: list[list[int]], max_window: int) -> tuple[list[tuple[int, int]], int]:
    """Windows maximising the total of ``savings[s][e]``; a longer window only when strictly better."""
    num_frames = len(savings)
    best = [0] * (num_frames + 1)  # best[i]: the best total over frames 0..i-1
    window_start = [0] * num_frames
    for last in range(num_frames):
        best[last + 1] = best[last]  # the frame alone
        window_start[last] = last
        for length in range(2, min(last + 1, max_window) + 1):
            start = last - length + 1
            total = best[start] + savings[start][last]
            if total > best[last + 1]:
                best[last + 1] = total
                window_start[last] = start
    windows = []
    last = num_frames - 1
    while last >= 0:
        windows.append((window_start[last], last))
        last = window_start[last] - 1
    return windows[::-1], best[num_frames]


def _check_window_arguments(features: torch.Tensor, tau: float, max_window: int | None) -> int:
    if features.ndim != 3 or not features.is_floating_point():
        raise ValueError(f"expected floating-point features [F,N,C], got {features.dtype} {tuple(features.shape)}")
    num_frames, num_patches, width = features.shape
    if num_frames < 1 or width < 1 or num_patches < 1 or math.isqrt(num_patches) ** 2 != num_patches:
        raise ValueError(
            f"expected features [F,N,C] with F >= 1, C >= 1 and N a square grid's patch count (no CLS), "
            f"got {tuple(features.shape)}"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if max_window is None:
        return num_frames
    if isinstance(max_window, bool) or not isinstance(max_window, int) or max_window < 1:
        raise ValueError(f"max_window must be None or an int >= 1, got {max_window!r}")
    return max_window


def static_windows(
    features: torch.Tensor, tau: float = 0.8, max_window: int | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Temporal windows ``[(start, end), ...]`` (inclusive, in frame order) and their total saving.

    Args:
        features: ``[F, N, C]`` patch features of consecutive frames.
        tau: cosine-similarity threshold above which a patch counts as unchanged.
        max_window: the most frames in one window; None: F.
    """
    max_window = _check_window_arguments(features, tau, max_window)
    savings = window_savings(static_reach(features, tau))
    return partition(savings.tolist(), max_window)


def dpc_knn_merge(
    tokens: torch.Tensor, clusters: int, k_density: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of each row's tokens and the merge into the centres (rule 7).

    Args:
        tokens: ``[B, n, C]`` float32, B independent sets of n tokens.
        clusters: centres per set, 0..n.

    Returns:
        ``(centres [B, m] int64 ascending, merged [B, m, C] float32)`` with m = ``clusters``.
    """
    batch, count, width = tokens.shape
    if clusters == 0:
        return tokens.new_empty(batch, 0, dtype=torch.long), tokens.new_empty(batch, 0, width)
    if clusters >= count:  # every token is a centre with no members
        return torch.arange(count, device=tokens.device).expand(batch, -1), tokens
    # The difference kernel (not the Gram-matrix one) gives an exact zero diagonal and an exactly
    # symmetric matrix, so equal densities (k = 1: every token is its own nearest) tie exactly.
    distances = torch.cdist(tokens, tokens, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(width)
    nearest = distances.topk(min(k_density, clusters), dim=-1, largest=False).values  # [B, n, k]
    density = torch.exp(-(nearest**2).mean(dim=-1))  # [B, n]
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j is strictly denser than i
    farthest = distances.amax(dim=(1, 2))  # [B]
    delta = torch.where(denser, distances, farthest[:, None, None]).amin(dim=-1)  # [B, n]
    # A stable descending sort keeps equal scores in index order: ties go to the lowest index.
    ranked = torch.sort(delta * density, dim=1, descending=True, stable=True).indices[:, :clusters]
    centres = ranked.sort(dim=1).values  # [B, m]

    to_centre = distances.gather(2, centres[:, None, :].expand(-1, count, -1))  # [B, n, m]
    nearest_centre = to_centre.argmin(dim=-1)  # [B, n]; argmin returns the first (lowest) on ties
    is_member = torch.ones(batch, count, dtype=torch.bool, device=tokens.device).scatter_(1, centres, False)
    membership = torch.nn.functional.one_hot(nearest_centre, clusters).float() * is_member[..., None]  # [B, n, m]
    members = membership.sum(dim=1)  # [B, m]
    member_mean = torch.bmm(membership.transpose(1, 2), tokens) / members.clamp(min=1)[..., None]  # [B, m, C]
    centre_tokens = tokens.gather(1, centres[..., None].expand(-1, -1, width))
    merged = torch.where(members[..., None] > 0, beta * centre_tokens + (1 - beta) * member_mean, centre_tokens)
    return centres, merged


def _exact(value: float) -> Fraction:
    """The decimal ``value`` prints as, exactly (0.1 -> 1/10)."""
    return Fraction(str(float(value)))


def holitom(
    features: torch.Tensor,
    importance: torch.Tensor,
    retention: float,
    *,
    tau: float = 0.8,
    contextual_share: float = 0.0,
    beta: float = 0.6,
    k_density: int = 7,
    max_window: int | None = None,
) -> list[WindowTokens]:
    """Reduce one segment's ``features [F, N, C]`` to about ``retention``·F·N tokens (rules above).

    Args:
        features: ``[F, N, C]`` patch features of F consecutive frames (any float dtype).
        importance: ``[F, N]`` each patch's importance, non-negative.
        retention: the share of the F·N tokens to keep, in (0, 1].
        tau: similarity threshold of a static patch, in [0, 1] (1: nothing is static).
        contextual_share: the share of each frame's kept dynamic tokens that are cluster centres
            rather than top-importance tokens, in [0, 1] (the public code's D).
        beta: a merged centre's own weight, in [0, 1].
        k_density: neighbours of the DPC-kNN density (capped at the number of centres).
        max_window: the most frames in one window; None: F.

    Returns:
        One `WindowTokens` per window, in frame order; the windows partition 0..F-1.
    """
    max_window = _check_window_arguments(features, tau, max_window)
    if importance.shape != features.shape[:2]:
        raise ValueError(f"expected importance [F,N] = {tuple(features.shape[:2])}, got {tuple(importance.shape)}")
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    if not 0.0 <= contextual_share <= 1.0:
        raise ValueError(f"contextual_share must be in [0, 1], got {contextual_share}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if isinstance(k_density, bool) or not isinstance(k_density, int) or k_density < 1:
        raise ValueError(f"k_density must be an int >= 1, got {k_density!r}")
    if not bool((importance >= 0).all()):
        raise ValueError("importance must be non-negative (and not NaN)")

    num_frames, num_patches, width = features.shape
    device = features.device
    values = features.float()
    weights = importance.float()
    reach = static_reach(values, tau)
    windows, saving = partition(window_savings(reach).tolist(), max_window)
    total = num_frames * num_patches
    ratio = min(_exact(retention) * total / (total - saving), Fraction(1))  # saving < total always
    dominant_share = 1 - _exact(contextual_share)

    reduced = []
    for start, end in windows:
        frames = torch.arange(start, end + 1, device=device)
        if end > start:
            static = reach[start] >= end  # [N]
        else:
            static = torch.zeros(num_patches, dtype=torch.bool, device=device)
        static_index = static.nonzero().flatten()  # [S]
        dynamic_index = (~static).nonzero().flatten()  # [L]
        window_values = values[start : end + 1]  # [W, N, C]
        window_weights = weights[start : end + 1]  # [W, N]

        # Static: one token per static position (its mean over the window), then DPC-kNN; a window whose
        # every position is static keeps at least one token.
        clusters = round(len(static_index) * ratio)
        if clusters == 0 and len(static_index) == num_patches:
            clusters = 1
        centres, static_tokens = dpc_knn_merge(
            window_values[:, static_index].mean(dim=0)[None], clusters, k_density, beta
        )
        static_positions = static_index[centres[0]]
        static_scores = window_weights[:, static_positions].mean(dim=0)
        static_tokens = static_tokens[0]

        # Dynamic: per frame, the top-importance tokens, then DPC-kNN of the rest, batched over frames.
        dynamic_values = window_values[:, dynamic_index]  # [W, L, C]
        dynamic_weights = window_weights[:, dynamic_index]  # [W, L]
        keep = math.ceil(len(dynamic_index) * ratio)
        dominant = round(keep * dominant_share)
        by_importance = torch.sort(dynamic_weights, dim=1, descending=True, stable=True).indices  # ties: lowest first
        top = by_importance[:, :dominant]  # [W, D]
        rest = by_importance[:, dominant:].sort(dim=1).values  # [W, L-D], in position order
        rest_values = dynamic_values.gather(1, rest[..., None].expand(-1, -1, width))
        centres, contextual_tokens = dpc_knn_merge(rest_values, keep - dominant, k_density, beta)
        local = torch.cat([top, rest.gather(1, centres)], dim=1)  # [W, keep], index into L
        dominant_tokens = dynamic_values.gather(1, top[..., None].expand(-1, -1, width))
        dynamic_tokens = torch.cat([dominant_tokens, contextual_tokens], dim=1)  # [W, keep, C]
        dynamic_positions = dynamic_index[local]  # [W, keep]
        dynamic_scores = dynamic_weights.gather(1, local)
        dynamic_frames = frames[:, None].expand_as(local)

        tokens = torch.cat([static_tokens, dynamic_tokens.flatten(0, 1)])
        positions = torch.cat([static_positions, dynamic_positions.flatten()])
        first_frame = torch.cat([torch.full_like(static_positions, start), dynamic_frames.flatten()])
        last_frame = torch.cat([torch.full_like(static_positions, end), dynamic_frames.flatten()])
        scores = torch.cat([static_scores, dynamic_scores.flatten()])
        # Static and dynamic positions are disjoint, so (first_frame, position) keys are unique.
        order = torch.argsort(first_frame * num_patches + positions)
        reduced.append(
            WindowTokens(
                start=start,
                end=end,
                tokens=tokens[order].to(features.dtype),
                positions=positions[order],
                first_frame=first_frame[order],
                last_frame=last_frame[order],
                scores=scores[order],
            )
        )
    return reduced
