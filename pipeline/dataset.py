"""PyTorch datasets over an output directory: one LLaVA-style token sequence per video, plus budgets.

`TokenDataset` is map-style (random access through `TokenReader`); `TokenIterableDataset` streams
videos in storage order, split across `DataLoader` workers and distributed ranks, so each worker
reads its own row groups once. `collate_tokens` pads a batch to its longest sequence.

Temporal outputs (``holitom``, a row per temporal window): budgets count source frames and cut windows
(`select_frames`), sequences run over the source frames (`pipeline.sequence`), and a sample's
``last_frame`` says how far each token reaches.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from operators.sampling import uniform_indices
from pipeline.reader import Frame, TokenReader, VideoTokens, View
from pipeline.sequence import SequenceLayout, llava_sequence


def select_frames(video: VideoTokens, max_frames: int) -> VideoTokens:
    """At most ``max_frames`` source frames, spread uniformly over the video (first and last kept).

    Per-frame outputs: the rows of those frames. Temporal outputs (``holitom``, rows are windows of
    frames): the same uniform choice over the source frames the rows cover, so the frames kept are the
    ones a per-frame output of the same sampling keeps, and each window is cut to its kept frames: a
    token stays when one of the frames it stands for is kept, its first/last frame narrowed to the
    kept ones (a static token stands for each frame of its window, so it still stands for the kept
    ones, and sits with the first kept one); a window none of whose frames is kept goes. Keeping whole
    windows instead could not meet the budget when one window is longer than ``max_frames`` (a static
    shot is one window of up to ``segment_frames`` frames) and would favour short windows over time
    coverage."""
    covered = [(r, k) for r, frame in enumerate(video.frames) for k in range(len(frame.frame_indices))]
    if len(covered) <= max_frames:
        return video
    chosen = [covered[i] for i in uniform_indices(len(covered), max_frames)]
    if all(len(frame.frame_indices) == 1 for frame in video.frames):
        return dataclasses.replace(video, frames=tuple(video.frames[r] for r, _ in chosen))
    kept: dict[int, list[int]] = {}
    for r, k in chosen:
        kept.setdefault(r, []).append(k)
    frames = tuple(video.frames[r] if len(ks) == len(video.frames[r].frame_indices)
                   else _cut_window(video.frames[r], ks) for r, ks in kept.items())
    return dataclasses.replace(video, frames=frames)


def _cut_window(frame: Frame, kept: list[int]) -> Frame:
    """``frame`` (a window) standing for its frames ``kept`` (positions in ``frame_indices``, ascending) only."""
    numbers = [frame.frame_indices[k] for k in kept]
    times = [frame.timestamps[k] for k in kept]
    wanted = np.asarray(numbers, dtype=np.int64)  # ascending, like the window's frames
    views = []
    for view in frame.views:
        first, last = view.first_frames.numpy(), view.last_frames.numpy()
        lo = np.searchsorted(wanted, first, side="left")  # the first kept frame at or after the token's first
        hi = np.searchsorted(wanted, last, side="right") - 1  # the last kept frame at or before its last
        mask = lo <= hi  # the token stands for at least one kept frame
        keep = torch.from_numpy(mask)
        views.append(View(view.tile_index, view.tokens[keep], view.positions[keep], view.scores[keep],
                          torch.from_numpy(wanted[lo[mask]].astype(np.int32)),
                          torch.from_numpy(wanted[hi[mask]].astype(np.int32))))
    return dataclasses.replace(frame, frame_index=numbers[0], timestamp_s=times[0], global_view=views[0],
                               tiles=tuple(views[1:]), frame_indices=tuple(numbers), timestamps=tuple(times))


def cap_tokens(video: VideoTokens, max_tokens: int) -> VideoTokens:
    """At most ``max_tokens`` tokens over the whole video: the lowest-score tokens of any frame or
    tile are dropped (ties: later tokens first); the kept ones stay in their order. A merged extra
    token competes with its score, the attention mass it absorbed. A frame may lose all its tokens."""
    if video.num_tokens <= max_tokens:
        return video
    scores = torch.cat([view.scores for frame in video.frames for view in frame.views])  # [T]
    ranking = torch.from_numpy(np.argsort(-scores.numpy(), kind="stable"))
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[ranking[:max_tokens]] = True

    frames, start = [], 0
    for frame in video.frames:
        views = []
        for view in frame.views:
            mask = keep[start : start + view.num_tokens]
            views.append(View(view.tile_index, view.tokens[mask], view.positions[mask], view.scores[mask],
                              view.first_frames[mask], view.last_frames[mask]))
            start += view.num_tokens
        frames.append(dataclasses.replace(frame, global_view=views[0], tiles=tuple(views[1:])))
    return dataclasses.replace(video, frames=tuple(frames))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per-video limits, applied in this order: frames (uniform subsampling of the source frames, `select_frames`;
    temporal outputs' windows are cut to the kept frames), then tokens (by score, `cap_tokens`)."""

    max_frames: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def apply(self, video: VideoTokens) -> VideoTokens:
        if self.max_frames is not None:
            video = select_frames(video, self.max_frames)
        if self.max_tokens is not None:
            video = cap_tokens(video, self.max_tokens)
        return video


def make_sample(video: VideoTokens, budget: Budget, layout: SequenceLayout) -> dict:
    """The dataset item of one video: its id and the fields of its `TokenSequence`."""
    sequence = llava_sequence(budget.apply(video), layout)
    return {"video_id": video.video_id, **{f.name: getattr(sequence, f.name) for f in dataclasses.fields(sequence)}}


class TokenDataset(Dataset):
    """Map-style: item ``i`` is video ``video_ids[i]`` as a sample dict (see `make_sample`)."""

    def __init__(
        self,
        out_dir: str,
        video_ids: Sequence[str] | None = None,
        budget: Budget = Budget(),
        layout: SequenceLayout = SequenceLayout(),
    ) -> None:
        self.reader = TokenReader(out_dir)
        self.video_ids = list(video_ids) if video_ids is not None else self.reader.video_ids()
        self.budget = budget
        self.layout = layout

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        return make_sample(self.reader.load(self.video_ids[i]), self.budget, self.layout)


class TokenIterableDataset(IterableDataset):
    """Streams every video once per epoch. Videos are taken in storage order and cut into contiguous
    runs, one per (rank, worker), so each worker reads its own row groups. ``shuffle`` permutes the
    order of row groups and of videos within them (seeded by ``seed`` and `set_epoch`). With several
    ranks every rank gets the same number of videos (up to ``world_size - 1`` are left out per epoch)."""

    def __init__(
        self,
        out_dir: str,
        budget: Budget = Budget(),
        layout: SequenceLayout = SequenceLayout(),
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.reader = TokenReader(out_dir)
        self.budget = budget
        self.layout = layout
        self.shuffle = shuffle
        self.seed = seed
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> list[str]:
        """This epoch's video order over all ranks, before the split."""
        groups = [list(group) for group in self.reader.storage_groups()]
        if self.shuffle:
            rng = random.Random(f"{self.seed}-{self.epoch}")
            rng.shuffle(groups)
            for group in groups:
                rng.shuffle(group)
        return [video_id for group in groups for video_id in group]

    def worker_videos(self) -> list[str]:
        """The contiguous run of `epoch_order` this (rank, DataLoader worker) streams."""
        order = self.epoch_order()
        per_rank = len(order) // self.world_size if self.world_size > 1 else len(order)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        worker = get_worker_info()
        if worker is None:
            return mine
        bounds = np.linspace(0, len(mine), worker.num_workers + 1).astype(int)
        return mine[bounds[worker.id] : bounds[worker.id + 1]]

    def __iter__(self) -> Iterator[dict]:
        for video_id in self.worker_videos():
            yield make_sample(self.reader.load(video_id), self.budget, self.layout)


def collate_tokens(samples: list[dict]) -> dict:
    """Pad samples to the batch's longest sequence (``L``) and most frames (``F``).

    Returns ``tokens [B, L, C]`` (zeros past the end), ``attention_mask [B, L]`` (True on real
    positions, separators included), ``is_separator``/``frame``/``last_frame``/``tile``/``position``/``score``
    ``[B, L]`` (padding: False/-1/-1/-1/-1/0), ``lengths [B]``, ``timestamps_s``/``frame_index`` ``[B, F]``
    (padding NaN/-1; F counts source frames, also for temporal outputs), ``frame_mask [B, F]`` and
    ``video_id`` (list of B strings).
    """
    lengths = torch.tensor([len(s["is_separator"]) for s in samples])
    num_frames = torch.tensor([len(s["frame_index"]) for s in samples])

    def pad(name: str, value, length: int) -> torch.Tensor:
        first = samples[0][name]
        out = torch.full((len(samples), length, *first.shape[1:]), value, dtype=first.dtype)
        for row, sample in enumerate(samples):
            out[row, : len(sample[name])] = sample[name]
        return out

    longest, most_frames = int(lengths.max()), int(num_frames.max())
    return {
        "video_id": [s["video_id"] for s in samples],
        "tokens": pad("tokens", 0.0, longest),
        "attention_mask": torch.arange(longest)[None, :] < lengths[:, None],
        "is_separator": pad("is_separator", False, longest),
        "frame": pad("frame", -1, longest),
        "last_frame": pad("last_frame", -1, longest),
        "tile": pad("tile", -1, longest),
        "position": pad("position", -1, longest),
        "score": pad("score", 0.0, longest),
        "lengths": lengths,
        "timestamps_s": pad("timestamps_s", float("nan"), most_frames),
        "frame_index": pad("frame_index", -1, most_frames),
        "frame_mask": torch.arange(most_frames)[None, :] < num_frames[:, None],
    }

