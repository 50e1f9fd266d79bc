"""Video decoders side by side: do they return the right frames on real-world file kinds, how fast, how many reads.

Right frames: on every clip of ``tests/data/hostile-videos`` (each picture carries its own frame number),
8 uniform indices over the decoder's own frame count. A returned frame is right when its picture is the
presented frame with that index (the reference: PyAV decoding the whole stream in order, edit lists
applied) and its timestamp is that frame's time on the player's timeline (pts minus the container's
start time; frame k at k/fps for AVI) within 1 ms. An index past the presented frames is wrong.

Speed: a 60-s 1080p H.264 clip (30 fps, a key frame every 5 s, B-frames, moving real pictures, 6 Mbit/s),
made with PyAV by `hd_clips.make_clip`; 8 uniform frames and ``--fps 1`` (60 frames), decoded to 336 px
high (the job's crop size). Printed: wall ms per sampled frame (best of ``--repeats``) and the bytes read
from the file divided by its size (``/proc/self/io`` rchar, so 1.0 = the file read once).

Decoders: decord 0.6 (``VideoReader(width, height)`` + ``get_batch``; needs ``pip install -e ".[bench]"``)
and the job's PyAV reader (`operators.decode.VideoReader`: one demux pass, then seek to the key frame
before each target and decode forward), with FFmpeg's threads and with one thread.

    python benchmarks/bench_decoders.py
    python benchmarks/bench_decoders.py --workdir /tmp/bench-hd-clips --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hd_clips import make_clip  # noqa: E402
from media import frame_number  # noqa: E402
from operators.decode import DecodedFrame, VideoReader  # noqa: E402
from operators.sampling import FrameSampling, sample_frame_indices, uniform_indices  # noqa: E402

HOSTILE = ROOT / "tests" / "data" / "hostile-videos"

# name -> (frames a decoder reports, frame indices) -> (pictures [n, H, W, 3] uint8, timestamps [n] s)
Decoder = Callable[[str, Callable[[int], np.ndarray], int | None], tuple[int, np.ndarray, np.ndarray]]


def rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def decord_decoder(path: str, choose, height: int | None):
    import decord

    size = {}
    if height:
        probe = decord.VideoReader(path, ctx=decord.cpu(0))
        h, w = probe[0].shape[:2]
        size = {"width": round(w * height / h), "height": height}
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **size)
    indices = choose(len(reader))
    pictures = reader.get_batch(indices.tolist()).asnumpy()
    return len(reader), pictures, reader.get_frame_timestamp(indices)[:, 0].astype(np.float64)


def pyav_decoder(threads: int):
    def decode(path: str, choose, height: int | None):
        size_for = (lambda w, h: (round(w * height / h), height)) if height else None
        with VideoReader(path, threads=threads) as reader:
            indices = choose(reader.info.num_frames)
            frames = [f for f in reader.frames(indices, size_for) if isinstance(f, DecodedFrame)]
            count = reader.info.num_frames
        return count, np.stack([f.pixels for f in frames]), np.array([f.timestamp_s for f in frames])
    return decode


def decoders() -> dict[str, Decoder]:
    found = {"pyav (threads auto)": pyav_decoder(0), "pyav (1 thread, the job's)": pyav_decoder(1)}
    if importlib.util.find_spec("decord") is None:
        print("decord is not installed (pip install -e '.[bench]'): compared without it")
        return found
    return {"decord 0.6": decord_decoder, **found}


def reference(path: Path) -> tuple[list[int], np.ndarray]:
    """The presented frames' numbers and player times (PyAV decoding in order)."""
    with av.open(str(path)) as container:
        start = (container.start_time or 0) / 1e6
        rate = float(container.streams.video[0].average_rate or 0)
        frame_order = container.format.name == "avi"
        numbers, times = [], []
        for k, frame in enumerate(container.decode(video=0)):
            numbers.append(frame_number(frame.reformat(width=64, height=48, format="rgb24").to_ndarray()))
            times.append(k / rate if frame_order else float(frame.pts * frame.time_base) - start)
    return numbers, np.array(times)


def correctness(found: dict[str, Decoder]) -> None:
    print("\n== right frames: 8 uniform indices per clip (right/returned; 'error' = refused the file)")
    names = sorted(p.name for p in HOSTILE.iterdir() if p.suffix != ".md" and not p.name.startswith("audio"))
    print(f"{'clip':<24}" + "".join(f"{d:>22}" for d in found))
    totals = {d: [0, 0] for d in found}
    for name in names:
        numbers, times = reference(HOSTILE / name)
        cells = []
        for label, decode in found.items():
            try:
                chosen: list[np.ndarray] = []

                def choose(count: int) -> np.ndarray:
                    chosen.append(uniform_indices(count, 8))
                    return chosen[0]

                _, pictures, stamps = decode(str(HOSTILE / name), choose, None)
                right = sum(
                    int(index < len(numbers) and frame_number(np.ascontiguousarray(picture)) == numbers[index]
                        and abs(stamp - times[index]) < 1e-3)
                    for index, picture, stamp in zip(chosen[0].tolist(), pictures, stamps))
                totals[label][0] += right
                totals[label][1] += len(chosen[0])
                cells.append(f"{right}/{len(chosen[0])}")
            except Exception as error:  # noqa: BLE001 - a decoder refusing a playable file is a result
                totals[label][1] += 8
                cells.append(f"error ({type(error).__name__})")
        print(f"{name:<24}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'all':<24}" + "".join(f"{f'{r}/{n}':>22}" for r, n in totals.values()))


def speed(found: dict[str, Decoder], clip: Path, repeats: int) -> None:
    size = clip.stat().st_size
    print(f"\n== speed: {clip.name} (1080p H.264, 60 s, key frame every 5 s), decoded to 336 px high")
    print(f"{'decoder':<22}{'sampling':<12}{'frames':>8}{'ms/frame':>12}{'file reads':>12}")
    with VideoReader(str(clip)) as reader:
        info = reader.info
    for sampling_name, sampling in (("8 uniform", FrameSampling(num_frames=8)),
                                    ("--fps 1", FrameSampling(num_frames=None, fps=1.0))):
        wanted = sample_frame_indices(info, sampling)
        for label, decode in found.items():
            best, reads = float("inf"), 0.0
            for _ in range(repeats):
                before, started = rchar(), time.perf_counter()
                _, pictures, _ = decode(str(clip), lambda count: wanted, 336)
                best = min(best, time.perf_counter() - started)
                reads = (rchar() - before) / size
            assert len(pictures) == len(wanted)
            print(f"{label:<22}{sampling_name:<12}{len(wanted):>8}{1000 * best / len(wanted):>12.1f}{reads:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench-hd-clips", help="where the 1080p clip is made (kept)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    found = decoders()
    correctness(found)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    speed(found, make_clip(workdir, 1920, 1080), args.repeats)


if __name__ == "__main__":
    main()
