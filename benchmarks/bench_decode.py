"""Decode cost per sampled frame: a user's naive script vs the job's decode stage, in process CPU time.

Inputs: 60-s H.264 clips at 1920x1080 and 1280x720 made by `hd_clips.make_clip` (30 fps, a key frame every
5 s, B-frames, 6 Mbit/s at 1080p, moving real pictures with grain; cached in ``--workdir``), 3 distinct
clips per size (2 with ``--quick``).

Sides, each taking a video's path to its model-ready 336x336 frames:

* naive: what a user's script does (as `naive_baseline.py`): ``decord.VideoReader(path, ctx=cpu(0))``
  with decord's defaults, indices ``np.linspace(0, len-1, n).astype(int)`` (``--fps 1``: frame
  ``round(k * video fps)`` for each second k), ``get_batch(indices).asnumpy()`` at full size, then the
  model's image processor (``CLIPImageProcessorPil``, shortest edge 336, centre crop 336, ``"pt"``).
* job exact: ``operators.frames.frame_rows`` (probe, sample, decode scaled to 336 px high, crop),
  consumed fully; the frames are the rows of kind ``frame``.
* job key-frame: the same with ``FrameSampling(..., key_frames=True)``: each sampled frame replaced by the
  nearest key frame between its neighbours (a key frame decodes alone), so its frames may differ from exact.

Cost: ``time.process_time()`` (CPU of all the process's threads, FFmpeg's and decord's included) and wall
time of one pass over a size's clips, divided by the frames returned; after one warm-up decode per side
(library start-up is not counted); the sides take turns, ``--repeats`` passes each, and the median is
printed. ``job/naive`` is the ratio of CPU per frame. Sampling: 8 and 32 uniform frames, ``--fps 1``
(60 frames); ``--quick``: 1080p, 8 uniform frames only, fewer repeats.

Check: every frame the job returns carries its frame number in its pixels (`hd_clips.read_number`); the
frame numbers read must equal the rows' ``frame_index``.

The last line printed is ``exact_ratio=X keyframe_ratio=Y``: job CPU per sampled frame / naive CPU per
sampled frame at 1080p, 8 uniform frames, for the exact and the key-frame mode.

    python benchmarks/bench_decode.py --quick       # 2 cores: about 3.5 min the first time (clips made), 1 min after
    python benchmarks/bench_decode.py               # about 20 min the first time, 17 min after
    python benchmarks/bench_decode.py --workdir /tmp/clips --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import decord
import numpy as np
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hd_clips import make_clip, read_number  # noqa: E402
from operators.frames import FrameRequest, frame_rows  # noqa: E402
from operators.sampling import FrameSampling  # noqa: E402

SIZES = {"1080p": (1920, 1080), "720p": (1280, 720)}
SAMPLINGS = {"8 uniform": FrameSampling(num_frames=8), "32 uniform": FrameSampling(num_frames=32),
             "--fps 1": FrameSampling(num_frames=None, fps=1.0)}
PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})

Decode = Callable[[str], int]  # a video's path -> the number of frames made model-ready


@dataclasses.dataclass(frozen=True)
class Cost:
    frames: int  # frames returned by one pass over the clips
    cpu_ms: float  # median process CPU ms per frame
    wall_ms: float  # median wall ms per frame


def naive(sampling: FrameSampling) -> Decode:
    """A user's script: decord with its defaults, full-size frames, the model's PIL image processor."""
    def decode(path: str) -> int:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        if sampling.num_frames is not None:
            indices = np.linspace(0, len(reader) - 1, sampling.num_frames).astype(int)
        else:
            indices = np.arange(0, len(reader), reader.get_avg_fps() / sampling.fps).round().astype(int)
            indices = indices[indices < len(reader)]
        frames = reader.get_batch(indices).asnumpy()
        return len(PROCESSOR(images=list(frames), return_tensors="pt")["pixel_values"])
    return decode


def job(sampling: FrameSampling) -> Decode:
    """The job's decode stage, every row consumed."""
    def decode(path: str) -> int:
        return sum(row["kind"] == "frame" for row in frame_rows(FrameRequest(path=path, sampling=sampling)))
    return decode


def job_modes(sampling: FrameSampling) -> dict[str, FrameSampling]:
    """The job's sampling in each mode: exact, and key-frame (each sampled frame replaced by a near key frame)."""
    return {"exact": sampling, "key-frame": dataclasses.replace(sampling, key_frames=True)}


def sides(sampling: FrameSampling) -> dict[str, Decode]:
    return {"naive": naive(sampling), **{f"job {mode}": job(chosen) for mode, chosen in job_modes(sampling).items()}}


def measure(found: dict[str, Decode], clips: list[Path], repeats: int) -> dict[str, Cost]:
    """Median cost per frame of each side over ``repeats`` passes over ``clips``, the sides taking turns."""
    passes: dict[str, list[tuple[int, float, float]]] = {label: [] for label in found}
    for _ in range(repeats):
        for label, decode in found.items():
            cpu, wall = time.process_time(), time.perf_counter()
            frames = sum(decode(str(clip)) for clip in clips)
            passes[label].append((frames, time.process_time() - cpu, time.perf_counter() - wall))
    return {label: Cost(runs[0][0], statistics.median(1000 * c / f for f, c, _ in runs),
                        statistics.median(1000 * w / f for f, _, w in runs))
            for label, runs in passes.items()}


def right_frames(clips: list[Path], sampling: FrameSampling) -> tuple[int, int]:
    """(frames whose pixels carry their row's ``frame_index``, frames returned) by the job."""
    right = total = 0
    for clip in clips:
        for row in frame_rows(FrameRequest(path=str(clip), sampling=sampling)):
            if row["kind"] == "frame":
                total += 1
                try:
                    right += read_number(row["pixels"][0]) == row["frame_index"]
                except AssertionError:  # no code block where it belongs: not the clip's picture
                    pass
    return right, total


def clip_set(workdir: Path, size: str, count: int) -> list[Path]:
    """``count`` distinct clips of ``size`` (made first when not cached), described on stdout."""
    width, height = SIZES[size]
    started = time.perf_counter()
    clips = [make_clip(workdir, width, height, variant=variant) for variant in range(count)]
    rates = ", ".join(f"{clip.stat().st_size * 8 / 60 / 1e6:.2f}" for clip in clips)
    print(f"{size}: {count} clips in {workdir} ({time.perf_counter() - started:.0f} s to make or find), "
          f"bitrates {rates} Mbit/s", flush=True)
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1080p, 8 uniform frames, 2 clips, 3 repeats")
    parser.add_argument("--workdir", default="/tmp/bench-hd-clips", help="where the clips are made (kept)")
    parser.add_argument("--repeats", type=int, help="passes per side (default 3 with --quick, else 5)")
    args = parser.parse_args()
    sizes = ["1080p"] if args.quick else list(SIZES)
    samplings = ["8 uniform"] if args.quick else list(SAMPLINGS)
    repeats = args.repeats or (3 if args.quick else 5)
    clips = {size: clip_set(Path(args.workdir), size, 2 if args.quick else 3) for size in sizes}

    for decode in sides(SAMPLINGS["8 uniform"]).values():  # warm-up: library start-up is not counted
        decode(str(clips[sizes[0]][0]))
    print(f"\n{'size':<7}{'sampling':<12}{'side':<15}{'frames':>7}{'CPU ms/frame':>14}{'wall ms/frame':>15}"
          f"{'job/naive':>11}", flush=True)
    costs: dict[tuple[str, str], dict[str, Cost]] = {}
    for size in sizes:
        for sampling in samplings:
            cell = costs[size, sampling] = measure(sides(SAMPLINGS[sampling]), clips[size], repeats)
            for label, cost in cell.items():
                ratio = "" if label == "naive" else f"{cost.cpu_ms / cell['naive'].cpu_ms:.3f}"
                print(f"{size:<7}{sampling:<12}{label:<15}{cost.frames:>7}{cost.cpu_ms:>14.1f}{cost.wall_ms:>15.1f}"
                      f"{ratio:>11}", flush=True)

    print("\nright frames (job): frames whose pixels carry their row's frame_index / frames returned")
    for size in sizes:
        for sampling in samplings:
            results = [f"{mode} {'/'.join(map(str, right_frames(clips[size], chosen)))}"
                       for mode, chosen in job_modes(SAMPLINGS[sampling]).items()]
            print(f"  {size} {sampling}: {', '.join(results)}")

    cell = costs["1080p", "8 uniform"]
    exact, keyframe = (cell[f"job {mode}"].cpu_ms / cell["naive"].cpu_ms for mode in ("exact", "key-frame"))
    print(f"exact_ratio={exact:.3f} keyframe_ratio={keyframe:.3f}")


if __name__ == "__main__":
    main()
