"""The project's job against the naive script (`naive_baseline.py`), side by side, plus storage.

Inputs (``--inputs``): ``hd1080`` (default), the realistic 60-s 1080p H.264 clips of `hd_clips` (B-frames, a
key frame every 5 s); or ``test-clips``, the decodable clips of ``tests/data/videos``; hard-linked under
distinct names until there are ``--videos`` of them (a hard link is an input of its own; the job takes a
symbolic link for the file it names, and encodes it once). Each run is its own fresh process, timed from
launch to exit (model loading, and the job's Ray start, included), on the same inputs with the same
model and frame sampling:

  * baseline: `benchmarks/naive_baseline.py` (decord, CLIP image processor, CLIPVisionModel with
    hidden states, published PruMerge loop, pandas);
  * job: `jobs/encode_videos.py` (embedded local Ray), ``--method prumerge``.

Both run once per ``--dtypes`` entry (float32, then bfloat16: this CPU has native bf16, then ``default``:
each side with its own default precision). Then, for storage, the job (its defaults) once per method on
one copy of each clip (the token counts of a clip do not depend
on how often it is repeated, and copies in one shard would compress against each other). Printed: frames/s of each run, the
job/baseline ratios, tokens and bytes per frame of each method against all patch tokens in fp16.

    python benchmarks/bench_end_to_end.py                         # ViT-B/14-336-sized random tower, 1080p inputs
    python benchmarks/bench_end_to_end.py --inputs test-clips --videos 200 --num-frames 2
    python benchmarks/bench_end_to_end.py --model openai/clip-vit-large-patch14-336   # the real tower
    python benchmarks/bench_end_to_end.py --tower vit-l --device cuda --dtypes float16,bfloat16 --num-frames 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.reader import TokenReader  # noqa: E402
from pipeline.report import summarize  # noqa: E402
from hd_clips import make_clip  # noqa: E402
from towers import TOWERS, save_tower  # noqa: E402

VIDEOS = ROOT / "tests" / "data" / "videos"  # the real clips the tests carry
UNDECODABLE = {"av1_video.mkv", "corrupted.mp4"}  # decord cannot open these (see tests/data/README.md)


def source_clips(inputs: str, workdir: Path) -> list[Path]:
    """The clips the inputs cycle over: the realistic 1080p clips (made in ``workdir`` once) or the test clips."""
    if inputs == "hd1080":
        return [make_clip(workdir, 1920, 1080, variant=variant) for variant in range(3)]
    return sorted(p for p in VIDEOS.iterdir() if p.name not in UNDECODABLE)


def link_inputs(directory: Path, clips: list[Path], count: int) -> Path:
    """``count`` hard links named ``NNNN_<clip>`` cycling over ``clips`` (copies where links cannot be made)."""
    directory.mkdir(parents=True)
    for i in range(count):
        clip = clips[i % len(clips)]
        try:
            os.link(clip, directory / f"{i:04d}_{clip.name}")
        except OSError:  # another filesystem
            shutil.copyfile(clip, directory / f"{i:04d}_{clip.name}")
    return directory


def timed(command: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of a fresh process; raises with its stderr when it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[1]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, result.stdout


def baseline_frames(output: Path) -> tuple[int, int]:
    """(frames, bytes) the baseline wrote."""
    files = list(output.glob("*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files), sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="vit-b14", help="random-weight tower geometry")
    parser.add_argument("--model", help="a real checkpoint (hub id or path) instead of a random tower")
    parser.add_argument("--inputs", choices=("hd1080", "test-clips"), default="hd1080")
    parser.add_argument("--workdir", default="/tmp/bench-hd-clips", help="where the 1080p clips are made (kept)")
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16,default",
                        help="each runs the baseline and the job ('default': neither is given --dtype)")
    parser.add_argument("--batch-size", type=int, default=16, help="the job's --batch-size")
    parser.add_argument("--device", default="cpu", help="where both runs put the model")
    parser.add_argument("--job-args", default="", help="extra flags for the job, e.g. '--num-encoders 2'")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")

    walls: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or str(save_tower(scratch / "tower", args.tower))
        clips = source_clips(args.inputs, Path(args.workdir))
        inputs = link_inputs(scratch / "videos", clips, args.videos)
        common = ["--input", str(inputs), "--model", model, "--num-frames", str(args.num_frames), "--device", args.device]
        baseline = [sys.executable, str(ROOT / "benchmarks" / "naive_baseline.py"), *common]
        job = [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), *common, "--batch-size", str(args.batch_size),
               *args.job_args.split()]
        frames = None
        for dtype in dtypes:
            for name, command in (("baseline", baseline), ("job", job)):
                output = scratch / f"{name}-{dtype}"
                precision = [] if dtype == "default" else ["--dtype", dtype]  # "default": each side's own
                walls[name, dtype], _ = timed([*command, "--output", str(output), *precision])
                count = baseline_frames(output)[0] if name == "baseline" else summarize(TokenReader(str(output))).frames
                if frames not in (None, count):
                    raise RuntimeError(f"{name} {dtype} encoded {count} frames, the first run {frames}")
                frames = count
        base_bytes = baseline_frames(scratch / f"baseline-{dtypes[0]}")[1]
        # Storage on one copy of each clip: copies of a clip in one shard would compress against each other.
        one_each = link_inputs(scratch / "one_each", clips, min(args.videos, len(clips)))
        reports = {}
        for method in ("prumerge", "prumerge+"):
            timed([*[str(one_each) if a == str(inputs) else a for a in job], "--output", str(scratch / method),
                   "--method", method])
            reports[method] = summarize(TokenReader(str(scratch / method)))

    print(f"model {args.model or 'random ' + args.tower}, inputs {args.inputs}, {args.videos} videos x {args.num_frames} frames "
          f"({frames} frames per run), device {args.device}, {torch.get_num_threads()} CPU threads")
    print(f"{'run':<24}{'wall s':>10}{'frames/s':>10}")
    for (name, dtype), wall in walls.items():
        print(f"{name + ' ' + dtype:<24}{wall:>10.1f}{frames / wall:>10.2f}")
    for dtype in dtypes:
        print(f"job / baseline, both {dtype}: {walls['baseline', dtype] / walls['job', dtype]:.2f}x")
    for dtype in dtypes[1:]:
        print(f"job {dtype} / baseline {dtypes[0]}: {walls['baseline', dtypes[0]] / walls['job', dtype]:.2f}x")
    full = reports["prumerge"].full_fp16_bytes_per_frame
    print(f"storage per frame vs all {reports['prumerge'].patches_per_view} patch tokens in fp16 ({full:,.0f} B):")
    for method, report in reports.items():
        print(f"  {method:<10} {report.tokens / report.frames:7.1f} tokens/frame  {report.bytes_per_frame:10,.0f} B/frame"
              f"  {report.bytes_per_frame / full:6.2%} of full  (target <= {'1/10' if method == 'prumerge' else '1/3'})")
    print(f"  baseline   {'':>19}{base_bytes / frames:10,.0f} B/frame  {base_bytes / frames / full:6.2%} of full")


if __name__ == "__main__":
    main()
