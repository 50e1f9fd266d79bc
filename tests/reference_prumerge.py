"""Plain-loop PruMerge / PruMerge+ / fixed-budget reference, written from the rules alone.

Deliberately naive and independent of `operators.prumerge`: numpy percentiles, Python lists of
indices, one cosine similarity per token pair, float64 throughout. Slow; use with small N.
"""

from __future__ import annotations

import numpy as np
import torch


def reference_prumerge(
    features: torch.Tensor,
    keys: torch.Tensor,
    importance: torch.Tensor,
    mode: str,
    budget: int | None = None,
    k_neighbors: int = 32,
) -> list[tuple[torch.Tensor, list[int], list[float]]]:
    """Return, per frame, (tokens [n, C] float64, positions, scores)."""
    frames = []
    for x, k, s in zip(features.double(), keys.double(), importance.double()):
        frames.append(_reference_frame(x, k, s, mode, budget, k_neighbors))
    return frames


def _reference_frame(x, k, s, mode, budget, k_neighbors):
    n = len(s)
    scores = s.numpy()
    if mode == "fixed":
        ranked = sorted(range(n), key=lambda i: scores[i], reverse=True)
        kept = ranked[:budget]
    else:
        q1 = np.percentile(scores, 25)
        q3 = np.percentile(scores, 75)
        bound = q3 + 1.5 * (q3 - q1)
        kept = [i for i in range(n) if scores[i] > bound]
        if mode == "prumerge+" and kept:
            ratio = len(kept) / n
            step = max(1, int(int(1 / ratio) / 3))
            for index in range(0, n - 1, step):
                if index not in kept:
                    kept.append(index)
    kept = sorted(kept)

    tokens, positions, token_scores = [], [], []
    for i in kept:
        similarities = []
        for j in range(n):
            if j == i:
                continue
            cosine = torch.dot(k[i], k[j]) / (torch.linalg.norm(k[i]) * torch.linalg.norm(k[j]))
            similarities.append((float(cosine), j))
        similarities.sort(key=lambda pair: pair[0], reverse=True)
        token = x[i].clone()
        for _, j in similarities[: min(k_neighbors, n - 1)]:
            token += s[j] * x[j]
        tokens.append(token)
        positions.append(i)
        token_scores.append(float(s[i]))

    extra = torch.zeros_like(x[0])
    pruned_mass = 0.0
    for j in range(n):
        if j not in kept:
            extra += s[j] * x[j]
            pruned_mass += float(s[j])
    tokens.append(extra)
    positions.append(-1)
    token_scores.append(pruned_mass)
    return torch.stack(tokens), positions, token_scores
