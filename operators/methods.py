"""Reduction specs (`--method`) and how each one turns one encoder pass into output rows.

A spec is ``prumerge``, ``prumerge+``, ``fixed:K`` (PruMerge's merge around the K top-scoring patches
of each view) or ``holitom:R`` (HoliTom's outer stage across the frames of a segment at retention R,
`operators.holitom`); ``--method`` takes a comma-separated list, every spec computed from the same
encoder output. Per-frame specs give one output row per frame (its views in it); a temporal spec one
row per temporal window. Every output token records the frames it stands for (first and last, as
positions in the batch's frames) and its patch position.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from operators.holitom import holitom
from operators.prumerge import prumerge

PER_FRAME = ("prumerge", "prumerge+", "fixed")
TEMPORAL = ("holitom",)
# HoliTom's published settings (the public code's evaluation scripts): similarity threshold, DPC-kNN
# neighbours, centre weight, contextual share (0: every kept dynamic token is a dominant one).
HOLITOM_DEFAULTS = {"tau": 0.8, "k_density": 7, "beta": 0.6, "contextual_share": 0.0}


@dataclass(frozen=True)
class MethodSpec:
    """One reduction: ``name`` (``prumerge``, ``prumerge+``, ``fixed``, ``holitom``) with its ``budget``
    (fixed: tokens kept per view) or ``retention`` (holitom: share of the segment's patches kept)."""

    name: str
    budget: int | None = None
    retention: float | None = None

    @property
    def temporal(self) -> bool:
        return self.name in TEMPORAL

    @property
    def text(self) -> str:
        """The spec in its one written form: ``prumerge``, ``fixed:64``, ``holitom:0.1`` (the shortest
        decimal that reads back as the retention)."""
        if self.budget is not None:
            return f"{self.name}:{self.budget}"
        return self.name if self.retention is None else f"{self.name}:{self.retention!r}"

    @property
    def dirname(self) -> str:
        """The spec's folder under the output when a run writes several: ``:`` written as ``-``."""
        return self.text.replace(":", "-")


def parse_methods(text: str, budget: int | None = None) -> tuple[MethodSpec, ...]:
    """``--method`` (and the older ``--budget`` for a lone ``fixed``) as specs, in the order written.

    Raises:
        ValueError: naming the spec: unknown name, a value missing, malformed or out of range (fixed:
            K >= 1; holitom: 0 < R <= 1), a spec given twice, or ``--budget`` with anything but one ``fixed``.
    """
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise ValueError(f"--method {text!r}: expected a comma-separated list of prumerge, prumerge+, fixed:K, "
                         "holitom:R")
    if budget is not None and items != ["fixed"]:
        raise ValueError("--budget is only used with --method fixed (write fixed:K in a list of methods)")
    specs = tuple(_parse_one(item, budget) for item in items)
    texts = [spec.text for spec in specs]
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise ValueError(f"--method names {', '.join(repeated)} more than once")
    return specs


def _parse_one(item: str, budget: int | None) -> MethodSpec:
    name, colon, value = item.partition(":")
    if name in ("prumerge", "prumerge+"):
        if colon:
            raise ValueError(f"--method {item}: {name} takes no value")
        return MethodSpec(name)
    if name == "fixed":
        if not colon and budget is None:
            raise ValueError("--method fixed needs a budget: fixed:K (or --budget K)")
        count = budget if not colon else int(value) if re.fullmatch(r"[0-9]+", value) else 0
        if count < 1:
            raise ValueError(f"--method {item}: K must be a whole number >= 1")
        return MethodSpec("fixed", budget=count)
    if name == "holitom":
        decimal = re.fullmatch(r"[0-9]*\.?[0-9]+(e-?[0-9]+)?", value, flags=re.IGNORECASE)
        retention = float(value) if decimal else math.nan
        if not 0 < retention <= 1:
            raise ValueError(f"--method {item}: holitom:R needs a retention 0 < R <= 1 (e.g. holitom:0.1)")
        return MethodSpec("holitom", retention=retention)
    raise ValueError(f"--method {item}: unknown method {name!r}; use prumerge, prumerge+, fixed:K or holitom:R")


@dataclass(frozen=True)
class ReducedRows:
    """One spec's output for a batch of F frames: output rows, each with its views' tokens.

    Row r stands for the batch frames ``row_frames[r]`` (positions in the batch, ascending) and holds
    ``row_views[r]`` views; the per-view lists run over all rows' views in order."""

    row_frames: list[list[int]]
    row_views: list[int]
    tokens: list[torch.Tensor]  # per view [n, C], the features' dtype
    positions: list[torch.Tensor]  # per view [n] int64 row-major patch index; -1: PruMerge's extra token
    scores: list[torch.Tensor]  # per view [n] float32
    first_frames: list[torch.Tensor]  # per view [n] int64: batch frame of the first frame a token stands for
    last_frames: list[torch.Tensor]  # per view [n] int64: ... the last

    @property
    def num_tokens(self) -> list[int]:
        return [len(p) for p in self.positions]


def reduce_views(spec: MethodSpec, features: torch.Tensor, keys: torch.Tensor, importance: torch.Tensor,
                 view_frames: list[int], segments: list[list[int]], k_neighbors: int) -> ReducedRows:
    """Apply ``spec`` to one encoder pass over a batch's views.

    Args:
        features, keys: ``[V, N, C]`` the encoder's selected-layer patch features and keys, one row per view.
        importance: ``[V, N]`` each patch's importance.
        view_frames: for each view, its frame's position in the batch (views of a frame are consecutive,
            global view first).
        segments: for a temporal spec, the batch frames reduced together, each a list of consecutive frames
            of one video (one view each); a frame in no segment is not reduced by it. Ignored per frame.
        k_neighbors: PruMerge's neighbours merged into each kept token.

    Raises:
        ValueError: a temporal spec given a frame with several views (AnyRes).
    """
    if not spec.temporal:
        reduced = prumerge(features, keys, importance, mode=spec.name, budget=spec.budget, k_neighbors=k_neighbors)
        frames = torch.tensor(view_frames, dtype=torch.int64)
        rows: list[list[int]] = []
        views: list[int] = []
        for frame in view_frames:
            if rows and rows[-1][0] == frame:
                views[-1] += 1
            else:
                rows.append([frame])
                views.append(1)
        own = [frames[v].expand(n) for v, n in enumerate(reduced.num_tokens)]
        return ReducedRows(rows, views, reduced.tokens, reduced.positions, reduced.scores, own, own)

    view_of = {frame: v for v, frame in enumerate(view_frames)}
    if len(view_of) != len(view_frames):
        raise ValueError(f"{spec.text} reduces single-view frames; AnyRes frames have several views")
    result = ReducedRows([], [], [], [], [], [], [])
    for segment in segments:
        index = torch.tensor([view_of[f] for f in segment], device=features.device)
        windows = holitom(features[index], importance[index], spec.retention, **HOLITOM_DEFAULTS)
        frames = torch.tensor(segment, dtype=torch.int64, device=features.device)
        for window in windows:
            result.row_frames.append(segment[window.start:window.end + 1])
            result.row_views.append(1)
            result.tokens.append(window.tokens)
            result.positions.append(window.positions)
            result.scores.append(window.scores)
            result.first_frames.append(frames[window.first_frame])
            result.last_frames.append(frames[window.last_frame])
    return result
