"""Plain-loop HoliTom outer-LLM reference, written from the method's description alone.

Deliberately naive and independent of `operators.holitom`: Python loops over frames, positions and
tokens, lists of indices, one dot product or distance per pair, float64 throughout. Slow; use with
small F, N and C. The rules it follows are listed in `operators.holitom`'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


@dataclass
class ReferenceWindow:
    start: int
    end: int
    tokens: torch.Tensor  # [M, C] float64
    positions: list[int]
    first_frame: list[int]
    last_frame: list[int]
    scores: list[float]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norms = max(float(torch.linalg.norm(a)), 1e-12) * max(float(torch.linalg.norm(b)), 1e-12)
    return min(float(torch.dot(a, b)) / norms, 1.0)


def _is_static(similarity, position, start, end, tau) -> bool:
    """Patch ``position`` is above ``tau`` for every consecutive pair of frames start..end."""
    return all(similarity[t][position] > tau for t in range(start, end))


def static_windows(features: torch.Tensor, tau: float = 0.8, max_window: int | None = None):
    """Return (windows [(start, end)], total saving, similarity [F-1][N])."""
    x = features.double()
    num_frames, num_patches = x.shape[:2]
    similarity = [[_cosine(x[t, p], x[t + 1, p]) for p in range(num_patches)] for t in range(num_frames - 1)]
    longest = num_frames if max_window is None else max_window

    def saving(start, end):
        static = sum(1 for p in range(num_patches) if _is_static(similarity, p, start, end, tau))
        return static * (end - start)

    best = {-1: 0}  # best[i]: the largest total saving of frames 0..i
    chosen_start = {}
    for last in range(num_frames):
        best[last] = best[last - 1]  # the frame on its own
        chosen_start[last] = last
        for start in range(last - 1, max(-1, last - longest), -1):  # ever longer windows ending at `last`
            candidate = best[start - 1] + saving(start, last)
            if candidate > best[last]:  # a longer window only when strictly better
                best[last] = candidate
                chosen_start[last] = start
    windows = []
    last = num_frames - 1
    while last >= 0:
        windows.insert(0, (chosen_start[last], last))
        last = chosen_start[last] - 1
    return windows, best[num_frames - 1], similarity


def _dpc_knn(points: list[torch.Tensor], clusters: int, k_density: int, beta: float):
    """Return (centre indices ascending, merged centre tokens) for a list of [C] float64 tokens."""
    count = len(points)
    if clusters == 0:
        return [], []
    width = len(points[0])
    distance = [[0.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(count):
            distance[i][j] = float(torch.linalg.norm(points[i] - points[j])) / math.sqrt(width)
    k = min(k_density, clusters)
    density = []
    for i in range(count):
        closest = sorted(distance[i])[:k]  # includes the token itself, at distance 0
        density.append(math.exp(-sum(d * d for d in closest) / k))
    largest = max(max(row) for row in distance)
    score = []
    for i in range(count):
        denser = [distance[i][j] for j in range(count) if density[j] > density[i]]
        delta = min(denser) if denser else largest
        score.append(delta * density[i])
    ranked = sorted(range(count), key=lambda i: (-score[i], i))
    centres = sorted(ranked[:clusters])
    members = {centre: [] for centre in centres}
    for i in range(count):
        if i in members:
            continue
        closest_centre = centres[0]
        for centre in centres[1:]:
            if distance[i][centre] < distance[i][closest_centre]:  # ties keep the lower centre
                closest_centre = centre
        members[closest_centre].append(i)
    merged = []
    for centre in centres:
        if members[centre]:
            mean = sum(points[i] for i in members[centre]) / len(members[centre])
            merged.append(beta * points[centre] + (1 - beta) * mean)
        else:
            merged.append(points[centre].clone())
    return centres, merged


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
) -> list[ReferenceWindow]:
    x = features.double()
    weight = importance.double()
    num_frames, num_patches, width = x.shape
    windows, total_saving, similarity = static_windows(features, tau, max_window)
    total = num_frames * num_patches
    ratio = Fraction(str(float(retention))) * total / (total - total_saving)
    if ratio > 1:
        ratio = Fraction(1)
    dominant_share = 1 - Fraction(str(float(contextual_share)))

    result = []
    for start, end in windows:
        frames = list(range(start, end + 1))
        if end > start:
            static = [p for p in range(num_patches) if _is_static(similarity, p, start, end, tau)]
        else:
            static = []
        dynamic = [p for p in range(num_patches) if p not in static]
        entries = []  # (first_frame, position, last_frame, token, score)

        # Static positions: averaged over the window, then clustered.
        averaged = [sum(x[t, p] for t in frames) / len(frames) for p in static]
        clusters = round(len(static) * ratio)
        if clusters == 0 and static and not dynamic:  # a window keeps at least one token
            clusters = 1
        centres, merged = _dpc_knn(averaged, clusters, k_density, beta)
        for centre, token in zip(centres, merged):
            position = static[centre]
            score = sum(float(weight[t, position]) for t in frames) / len(frames)
            entries.append((start, position, end, token, score))

        # Dynamic positions, frame by frame: the most important ones, then clusters of the rest.
        keep = math.ceil(len(dynamic) * ratio)
        dominant = round(keep * dominant_share)
        for t in frames:
            ranked = sorted(dynamic, key=lambda p: (-float(weight[t, p]), p))
            for position in ranked[:dominant]:
                entries.append((t, position, t, x[t, position].clone(), float(weight[t, position])))
            rest = sorted(ranked[dominant:])
            centres, merged = _dpc_knn([x[t, p] for p in rest], keep - dominant, k_density, beta)
            for centre, token in zip(centres, merged):
                position = rest[centre]
                entries.append((t, position, t, token, float(weight[t, position])))

        entries.sort(key=lambda entry: (entry[0], entry[1]))
        result.append(
            ReferenceWindow(
                start=start,
                end=end,
                tokens=torch.stack([e[3] for e in entries]) if entries else torch.zeros(0, width, dtype=torch.float64),
                positions=[e[1] for e in entries],
                first_frame=[e[0] for e in entries],
                last_frame=[e[2] for e in entries],
                scores=[e[4] for e in entries],
            )
        )
    return result
