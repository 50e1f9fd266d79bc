"""An hour-long frame-order video under the job's stall limit: progress, not output, is what the limit watches.

Makes (once, cached in ``--workdir``) an AVI of ``--minutes`` minutes at 30 fps with PyAV: MPEG-4 Part 2 at
``--size``, a key frame every 10 s, each picture carrying its frame number (the tests' 4x4 code). AVI stores no
presentation timestamps, so the job decodes it in order from the start (`operators.decode`): between two of 8
uniformly sampled frames the decoder works through about 1/7 of the hour, producing no output.

1. The decode alone (`operators.decode.VideoReader` with a progress counter, in this process): the longest time
   between two outputs (what the stall limit measured before: a limit below it stopped a healthy decode as
   hung), the longest time between two progress calls (what it measures now), and the progress calls made.
   Every decoded picture's number is checked against its frame index.
2. The job on the file with a random tiny CLIP tower (`towers.py`): with the default limit (``--decode-timeout-s``
   300 s), and with a limit of a quarter of the longest time between two outputs. Both must encode every
   sampled frame with no error row; the run's summary line and wall time are printed.

    python benchmarks/bench_long_input.py                         # 60 minutes at 160x120 (~2 min to make)
    python benchmarks/bench_long_input.py --minutes 10 --size 640x480 --workdir /tmp/long
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from media import frame_number, numbered_picture  # noqa: E402
from operators.decode import VideoReader  # noqa: E402
from operators.sampling import FrameSampling, sample_frame_indices  # noqa: E402
from towers import save_tower  # noqa: E402

FPS = 30


def make_avi(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """``frames`` frames of MPEG-4 Part 2 in AVI, frame i showing i; written once."""
    if path.exists():
        return path
    width, height = size
    partial = path.with_suffix(".partial.avi")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(10 * FPS)}
        stream.bit_rate = width * height * 4  # about 1.2 Mbit/s at 640x480
        for number in range(frames):
            picture = av.VideoFrame.from_ndarray(numbered_picture(number, width, height), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    partial.rename(path)
    return path


class Watch:
    """Progress calls and outputs, timed."""

    def __init__(self) -> None:
        self.calls = 0
        self.last_progress = self.last_output = time.monotonic()
        self.longest_progress_gap = self.longest_output_gap = 0.0

    def progress(self) -> None:
        now = time.monotonic()
        self.longest_progress_gap = max(self.longest_progress_gap, now - self.last_progress)
        self.last_progress = now
        self.calls += 1

    def output(self) -> None:
        now = time.monotonic()
        self.longest_output_gap = max(self.longest_output_gap, now - self.last_output)
        self.last_output = now


def decode_alone(path: Path) -> Watch:
    watch = Watch()
    with VideoReader(str(path), progress=watch.progress) as reader:
        indices = sample_frame_indices(reader.info, FrameSampling(num_frames=8))
        print(f"{reader.info.num_frames} frames, time source {reader.info.time_source}, sampled {indices.tolist()}")
        watch.last_output = watch.last_progress = time.monotonic()
        for decoded in reader.frames(indices):
            watch.output()
            assert frame_number(decoded.pixels) == decoded.index % 2**15, (decoded.index, frame_number(decoded.pixels))
    return watch


def job(path: Path, model: Path, output: Path, timeout_s: float) -> None:
    from pipeline.config import EncodeConfig
    from pipeline.run import run

    started = time.perf_counter()
    summary = run(EncodeConfig(input=str(path), output=str(output), model=str(model), num_frames=8,
                               decode_timeout_s=timeout_s, log_level="WARNING"))
    wall = time.perf_counter() - started
    print(f"  --decode-timeout-s {timeout_s:g}: {summary.lines()[0]}; frames {summary.frames}, error rows "
          f"{summary.error_rows}, {wall:.1f} s")
    assert (summary.encoded, summary.frames, summary.error_rows) == (1, 8, 0), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--size", default="160x120", help="WxH of the frames")
    parser.add_argument("--workdir", help="where the video, tower and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        frames = int(args.minutes * 60 * FPS)
        started = time.perf_counter()
        path = make_avi(work / f"long-{frames}-{args.size}.avi", frames, size)
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, ready in {time.perf_counter() - started:.0f} s")
        watch = decode_alone(path)
        print(f"decode alone: longest time between two outputs {watch.longest_output_gap:.2f} s, between two progress "
              f"calls {watch.longest_progress_gap * 1000:.1f} ms; {watch.calls} progress calls")
        model = save_tower(work / "tower", "tiny")
        print("the job, 8 uniform frames:")
        for limit in (300.0, max(0.5, round(watch.longest_output_gap / 4, 2))):
            job(path, model, work / f"out-{limit:g}-{time.time_ns()}", limit)


if __name__ == "__main__":
    main()
