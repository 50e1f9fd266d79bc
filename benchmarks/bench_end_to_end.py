"""The project's job against the naive script (`naive_baseline.py`), side by side, plus storage.

Inputs: the decodable clips of ``tests/data/videos`` linked under distinct names until there are
``--videos`` of them. Each run is its own fresh process, timed from launch to exit (model loading,
and the job's Ray start, included), on the same inputs with the same model and frame sampling:

  * baseline: `benchmarks/naive_baseline.py` (decord, CLIP image processor, CLIPVisionModel with
    hidden states, published PruMerge loop, pandas);
  * job: `jobs/encode_videos.py` (embedded local Ray), ``--method prumerge``.

Both run once per ``--dtypes`` entry (float32, then bfloat16: this CPU has native bf16). Then, for
storage, the job once per method on one copy of each clip (the token counts of a clip do not depend
on how often it is repeated, and copies in one shard would compress against each other). Printed: frames/s of each run, the
job/baseline ratios, tokens and bytes per frame of each method against all patch tokens in fp16.

    python benchmarks/bench_end_to_end.py                         # ViT-B/14-336-sized random tower
    python benchmarks/bench_end_to_end.py --model openai/clip-vit-large-patch14-336   # the real tower
    python benchmarks/bench_end_to_end.py --tower vit-l --device cuda --dtypes float16,bfloat16 --num-frames 8
"""

from __future__ import annotations

import argparse
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
from towers import TOWERS, save_tower  # noqa: E402

VIDEOS = ROOT / "tests" / "data" / "videos"  # the real clips the tests carry
UNDECODABLE = {"av1_video.mkv", "corrupted.mp4"}  # decord cannot open these (see tests/data/README.md)


def decodable_clips() -> list[Path]:
    return sorted(p for p in VIDEOS.iterdir() if p.name not in UNDECODABLE)


def link_inputs(directory: Path, count: int) -> Path:
    """``count`` links named ``NNNN_<clip>`` cycling over the decodable test clips."""
    clips = decodable_clips()
    directory.mkdir(parents=True)
    for i in range(count):
        clip = clips[i % len(clips)]
        (directory / f"{i:04d}_{clip.name}").symlink_to(clip)
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
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--num-frames", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="each dtype runs the baseline and the job")
    parser.add_argument("--batch-size", type=int, default=16, help="the job's --batch-size")
    parser.add_argument("--device", default="cpu", help="where both runs put the model")
    parser.add_argument("--job-args", default="", help="extra flags for the job, e.g. '--num-encoders 2'")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")

    walls: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or str(save_tower(scratch / "tower", args.tower))
        inputs = link_inputs(scratch / "videos", args.videos)
        common = ["--input", str(inputs), "--model", model, "--num-frames", str(args.num_frames), "--device", args.device]
        baseline = [sys.executable, str(ROOT / "benchmarks" / "naive_baseline.py"), *common]
        job = [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), *common, "--batch-size", str(args.batch_size),
               *args.job_args.split()]
        frames = None
        for dtype in dtypes:
            for name, command in (("baseline", baseline), ("job", job)):
                output = scratch / f"{name}-{dtype}"
                walls[name, dtype], _ = timed([*command, "--output", str(output), "--dtype", dtype])
                count = baseline_frames(output)[0] if name == "baseline" else summarize(TokenReader(str(output))).frames
                if frames not in (None, count):
                    raise RuntimeError(f"{name} {dtype} encoded {count} frames, the first run {frames}")
                frames = count
        base_bytes = baseline_frames(scratch / f"baseline-{dtypes[0]}")[1]
        # Storage on one copy of each clip: copies of a clip in one shard would compress against each other.
        one_each = link_inputs(scratch / "one_each", min(args.videos, len(decodable_clips())))
        reports = {}
        for method in ("prumerge", "prumerge+"):
            timed([*[str(one_each) if a == str(inputs) else a for a in job], "--output", str(scratch / method),
                   "--method", method, "--dtype", dtypes[0]])
            reports[method] = summarize(TokenReader(str(scratch / method)))

    print(f"model {args.model or 'random ' + args.tower}, {args.videos} videos x {args.num_frames} frames "
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
