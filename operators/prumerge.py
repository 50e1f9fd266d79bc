"""Per-frame adaptive token reduction: PruMerge and PruMerge+ (arXiv 2403.15388), and a fixed budget.

Every statistic is computed per frame, so a frame's output never depends on the rest of its batch
(the published code pools the IQR over the whole batch). Selection and merging are vectorised over
frames and kept tokens: the merge of a whole batch is one cosine-similarity product, one top-k and
one weighted-sum product, with no Python loop over tokens.

Semantics, for one frame with N patch scores ``s`` and features ``x``:
1. kept = { i : s_i > Q3 + 1.5·IQR } (linear-interpolated percentiles); it may be empty.
2. PruMerge+: with ratio = |kept|/N and step = max(1, int(int(1/ratio)/3)), add raster indices
   ``range(0, N-1, step)``; an empty kept set adds nothing.
   Fixed: kept = the ``budget`` highest-scoring tokens instead.
3. Each kept token i becomes ``x_i + Σ_j s_j·x_j`` over its ``k_neighbors`` most key-cosine-similar
   other tokens j (kept or not).
4. One extra token ``Σ_{j not kept} s_j·x_j`` is appended; its score is the sum of those ``s_j``.
Kept tokens come out in raster order (their patch index in ``positions``), the extra token last
with position -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Mode = Literal["prumerge", "prumerge+", "fixed"]
MODES: tuple[str, ...] = ("prumerge", "prumerge+", "fixed")
EXTRA_TOKEN_POSITION = -1


@dataclass(frozen=True)
class ReducedFrames:
    """Ragged per-frame reduction of a batch; entry i belongs to frame i of the input."""

    tokens: list[torch.Tensor]  # [n_i, C], the input features' dtype
    positions: list[torch.Tensor]  # [n_i] int64, row-major patch index; -1 for the extra token
    scores: list[torch.Tensor]  # [n_i] float32, importance of each kept token (extra: pruned mass)

    @property
    def num_tokens(self) -> list[int]:
        return [len(p) for p in self.positions]


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Kept mask ``[B, N]``: per frame, scores above Q3 + 1.5·IQR of that frame's ``scores [B, N]``."""
    stats = scores.double()  # float64, as numpy.percentile computes it
    q1, q3 = torch.quantile(stats, torch.tensor([0.25, 0.75], dtype=stats.dtype, device=stats.device), dim=1)
    upper_bound = q3 + 1.5 * (q3 - q1)  # [B]
    return stats > upper_bound[:, None]


def add_spatial_samples(kept: torch.Tensor) -> torch.Tensor:
    """PruMerge+: add raster indices ``range(0, N-1, step)`` to each frame's kept mask ``[B, N]``."""
    num_patches = kept.shape[1]
    counts = kept.sum(dim=1)  # [B]
    ratio = counts.double() / num_patches
    # step = int(int(1 / ratio) / 3), at least 1; frames with nothing kept get no samples.
    inverse = torch.where(counts > 0, (1.0 / ratio).floor(), torch.zeros_like(ratio))
    step = (inverse / 3).floor().clamp(min=1).long()  # [B]
    raster = torch.arange(num_patches, device=kept.device)
    sampled = (raster[None, :] % step[:, None] == 0) & (raster[None, :] < num_patches - 1) & (counts[:, None] > 0)
    return kept | sampled


def top_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Kept mask ``[B, N]`` holding exactly the ``budget`` highest scores of each frame."""
    kept = torch.zeros_like(scores, dtype=torch.bool)
    return kept.scatter_(1, scores.topk(budget, dim=1).indices, True)


def select_tokens(scores: torch.Tensor, mode: Mode, budget: int | None = None) -> torch.Tensor:
    """Kept mask ``[B, N]`` for ``mode`` from the importance ``scores [B, N]``."""
    if mode == "fixed":
        return top_budget(scores, budget)
    kept = iqr_outliers(scores)
    return add_spatial_samples(kept) if mode == "prumerge+" else kept


def merge_tokens(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    kept: torch.Tensor,
    k_neighbors: int = 32,
) -> ReducedFrames:
    """Merge every frame's pruned information into its kept tokens (rules 3 and 4 above).

    Args:
        features: ``[B, N, C]`` token features to merge (the encoder's selected layer).
        keys: ``[B, N, C]`` keys used for the cosine similarity between tokens.
        scores: ``[B, N]`` importance weights.
        kept: ``[B, N]`` bool mask of the tokens to keep; counts may differ between frames.
        k_neighbors: neighbours merged into each kept token (capped at N-1).
    """
    batch, num_patches, _ = features.shape
    counts = kept.sum(dim=1)  # [B]
    max_kept = int(counts.max()) if batch else 0
    scores = scores.float()
    values = features.float()

    # Kept patch indices in raster order, padded to the batch's largest kept set: a stable sort of
    # "not kept" puts each frame's kept indices first, in increasing order.
    kept_index = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :max_kept]  # [B, K]
    is_real = torch.arange(max_kept, device=kept.device)[None, :] < counts[:, None]  # [B, K]

    # Cosine similarity of each kept key with every key; dividing the small [B, K, N] product by the
    # norms costs far less than normalising all [B, N, C] keys first.
    keys = keys.float()
    key_norms = torch.linalg.vector_norm(keys, dim=-1).clamp_min(1e-12)  # [B, N]
    kept_keys = keys.gather(1, kept_index[..., None].expand(-1, -1, keys.shape[-1]))  # [B, K, C]
    similarity = torch.einsum("bkc,bnc->bkn", kept_keys, keys)  # [B, K, N]
    similarity /= key_norms.gather(1, kept_index)[..., None] * key_norms[:, None, :]
    similarity.scatter_(2, kept_index[..., None], float("-inf"))  # a token is not its own neighbour
    neighbours = similarity.topk(min(k_neighbors, num_patches - 1), dim=2).indices  # [B, K, k]

    # Each output token is a weighted sum of input tokens: row k of `weights` holds 1 at the kept
    # token itself and s_j at its neighbours; the last row holds s_j at every pruned token.
    neighbour_scores = scores[:, None, :].expand(-1, max_kept, -1).gather(2, neighbours)  # [B, K, k]
    weights = torch.zeros(batch, max_kept, num_patches, device=values.device)
    weights.scatter_(2, neighbours, neighbour_scores)
    weights.scatter_(2, kept_index[..., None], 1.0)
    pruned_scores = scores.masked_fill(kept, 0.0)  # [B, N]
    weights = torch.cat([weights, pruned_scores[:, None, :]], dim=1)  # [B, K+1, N]
    merged = torch.bmm(weights, values)  # [B, K+1, C]

    # Keep each frame's real rows plus its extra row, then split the packed rows per frame.
    extra_row = torch.ones(batch, 1, dtype=torch.bool, device=kept.device)
    real_rows = torch.cat([is_real, extra_row], dim=1)  # [B, K+1]
    row_positions = torch.cat([kept_index, torch.full_like(extra_row, EXTRA_TOKEN_POSITION, dtype=torch.long)], dim=1)
    row_scores = torch.cat([scores.gather(1, kept_index), pruned_scores.sum(dim=1, keepdim=True)], dim=1)
    sizes = (counts + 1).tolist()
    return ReducedFrames(
        tokens=list(merged[real_rows].to(features.dtype).split(sizes)),
        positions=list(row_positions[real_rows].split(sizes)),
        scores=list(row_scores[real_rows].split(sizes)),
    )


def prumerge(
    features: torch.Tensor,
    keys: torch.Tensor,
    importance: torch.Tensor,
    mode: Mode = "prumerge",
    budget: int | None = None,
    k_neighbors: int = 32,
) -> ReducedFrames:
    """Reduce each frame's ``features [B, N, C]`` to its own number of tokens.

    Args:
        features: ``[B, N, C]`` patch features (any float dtype; the merge runs in float32).
        keys: ``[B, N, C]`` the same layer's self-attention keys for the patches.
        importance: ``[B, N]`` each patch's importance score (PruMerge's: the CLS query's attention; see
            `operators.encode` for the other rules), non-negative, at most 1 in sum per frame.
        mode: ``"prumerge"`` (IQR outliers), ``"prumerge+"`` (outliers plus spatial samples) or
            ``"fixed"`` (exactly ``budget`` top-scoring tokens).
        budget: tokens to keep in ``"fixed"`` mode (1..N); must be None otherwise.
        k_neighbors: neighbours by key cosine similarity merged into each kept token.

    Returns:
        `ReducedFrames` with ``n_i = kept_i + 1`` tokens per frame (kept tokens in raster order, then
        the extra token).
    """
    if features.ndim != 3 or keys.shape != features.shape or importance.shape != features.shape[:2]:
        raise ValueError(
            "expected features [B,N,C], keys [B,N,C] and importance [B,N]; got "
            f"{tuple(features.shape)}, {tuple(keys.shape)}, {tuple(importance.shape)}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_patches = features.shape[1]
    if mode == "fixed":
        if budget is None or not 1 <= budget <= num_patches:
            raise ValueError(f"mode='fixed' needs 1 <= budget <= {num_patches}, got budget={budget}")
    elif budget is not None:
        raise ValueError(f"budget is only used with mode='fixed', not {mode!r}")
    if k_neighbors < 1:
        raise ValueError(f"k_neighbors must be >= 1, got {k_neighbors}")

    kept = select_tokens(importance, mode, budget)
    return merge_tokens(features, keys, importance, kept, k_neighbors)
