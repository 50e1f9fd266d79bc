"""The job against the encoder alone, and the job's peak memory on a 1-minute vs a 30-minute video.

Throughput (one process, one embedded Ray, measured side by side):
  * encoder alone: the same frames, already decoded and preprocessed in memory, through
    `VisionEncoder` + `prumerge` (pinned host memory and non-blocking copies on CUDA, as in the job),
    at each of ``--batch-sizes``; the fastest batch size is the one the job then uses;
  * the job: `pipeline.run` on the same videos (decode, encode, reduce, write), Ray already started.
  Printed: frames/s of each and their ratio (targets: >= 0.8 on the 2-core CPU machine, >= 0.85 on
  a GPU).

Memory: the job runs as a subprocess on a 1-minute and a 30-minute video made by looping a real
clip (packets remuxed with shifted timestamps, no re-encode); the summed RSS of the job's process
group (driver and its embedded Ray) is sampled every 0.2 s. Printed: both peaks and their ratio (target
<= 1.5). The memory runs use the tiny tower: the encoder's size does not depend on video length.

    python benchmarks/bench_pipeline.py                      # ViT-B/16-336-sized random tower
    python benchmarks/bench_pipeline.py --tower vit-l --copies 3 --skip-memory
    python benchmarks/bench_pipeline.py --tower vit-l --copies 30 --skip-memory --device cuda --dtype float16 \
        --batch-sizes 16,32,64,128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.decode import DecodedFrame, VideoReader  # noqa: E402
from operators.encode import VisionEncoder  # noqa: E402
from operators.towers import describe_tower  # noqa: E402
from operators.prumerge import prumerge  # noqa: E402
from operators.sampling import FrameSampling, sample_frame_indices  # noqa: E402
from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.run import run  # noqa: E402
from procfs import process_stats  # noqa: E402
from towers import TOWERS, save_tower  # noqa: E402

CLIP = ROOT / "tests" / "data" / "videos" / "flipping_a_pancake.mkv"
def loop_clip(source: Path, target: Path, seconds: float) -> Path:
    """Repeat ``source``'s video packets, timestamps shifted, until ``target`` lasts ``seconds``."""
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        packets = [p for p in src.demux(stream) if p.pts is not None]
    span = max(p.pts + (p.duration or 0) for p in packets) - min(p.pts for p in packets)
    loops = int(np.ceil(seconds / float(span * stream.time_base)))
    with av.open(str(source)) as src, av.open(str(target), "w", format="matroska") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for loop in range(loops):
            for packet in src.demux(src.streams.video[0]):
                if packet.pts is None:
                    continue
                packet.pts += loop * span
                packet.dts = None if packet.dts is None else packet.dts + loop * span
                packet.stream = out
                dst.mux(packet)
            src.seek(0)
    return target


def encoder_alone(videos: list[Path], model: Path, config: EncodeConfig, batch_sizes: list[int]) -> dict[int, float]:
    """Batch size → frames/s of VisionEncoder + prumerge on the job's frames, decoded beforehand."""
    preprocessing = config.preprocessing(describe_tower(str(model)))
    frames = []
    for path in videos:
        with VideoReader(str(path)) as reader:
            indices = sample_frame_indices(reader.info, FrameSampling(num_frames=config.num_frames, fps=config.fps))
            decoded = [f.pixels for f in reader.frames(indices, preprocessing.decode_size) if isinstance(f, DecodedFrame)]
        frames.append(preprocessing.square(np.stack(decoded)))
    pixels = torch.cat(frames)
    torch.set_num_threads(os.cpu_count())
    encoder = VisionEncoder(str(model), device=config.device, dtype=getattr(torch, config.dtype) if config.dtype else None)
    cuda = encoder.device.type == "cuda"
    if cuda:
        pixels = pixels.pin_memory()
    fps = {}
    for batch_size in batch_sizes:
        encoder(preprocessing.normalize(pixels[:batch_size].to(encoder.device)))  # warm-up at this shape
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in pixels.split(batch_size):
            out = encoder(preprocessing.normalize(batch.to(encoder.device, non_blocking=True)))
            reduced = prumerge(out.features, out.keys, out.importance, mode=config.method)
            torch.cat(reduced.tokens).cpu()  # the job copies the kept tokens back too
        fps[batch_size] = len(pixels) / (time.perf_counter() - start)
    return fps


def group_rss_bytes(group: int) -> int:
    """Summed resident memory of every process in process group ``group`` (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    # fields[2] is field 5 of /proc/PID/stat (pgrp), fields[21] field 24 (rss in pages)
    return sum(int(fields[21]) * page for fields in process_stats().values() if int(fields[2]) == group)


def peak_rss_of_job(video: Path, model: Path, output: Path) -> float:
    """Peak summed RSS (GiB) of the job (driver and its embedded Ray) on ``video`` at 1 frame per second."""
    command = [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(video), "--output",
               str(output), "--model", str(model), "--fps", "1"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    while job.poll() is None:
        peak = max(peak, group_rss_bytes(job.pid))
        time.sleep(0.2)
    if job.returncode:
        raise RuntimeError(f"job failed on {video}")
    return peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=6, help="copies of the real clips the throughput runs use")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--batch-sizes", default="16", help="encoder batch sizes to try; the job uses the fastest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: fp16 on CUDA, else fp32")
    parser.add_argument("--tower", choices=sorted(TOWERS), default="vit-b", help="random-weight tower geometry")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        inputs = scratch / "videos"
        inputs.mkdir()
        for copy in range(args.copies):
            for name in ("flipping_a_pancake.mkv", "nasa_13013.mp4"):
                (inputs / f"{copy:03d}_{name}").symlink_to(CLIP.parent / name)
        tower = save_tower(scratch / args.tower, args.tower)
        config = EncodeConfig(input=str(inputs), output=str(scratch / "out"), model=str(tower),
                              num_frames=args.num_frames, device=args.device, dtype=args.dtype)

        alone = encoder_alone(sorted(inputs.iterdir()), tower, config, [int(b) for b in args.batch_sizes.split(",")])
        best = max(alone, key=alone.get)
        config = dataclasses.replace(config, batch_size=best)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        summary = run(config)
        ray.shutdown()
        job_fps, alone_fps = summary.frames / summary.wall_s, alone[best]
        print(f"throughput, {args.tower} random tower, {len(list(inputs.iterdir()))} videos x {args.num_frames} frames, "
              f"{args.device} {args.dtype or 'default dtype'}, {os.cpu_count()} CPUs")
        for batch_size, fps in alone.items():
            print(f"  encoder alone (pre-decoded), batch {batch_size:4d}: {fps:6.2f} frames/s")
        print(f"  job (decode+encode+write), batch {best:4d}: {job_fps:6.2f} frames/s "
              f"({summary.frames} frames in {summary.wall_s:.1f} s)")
        print(f"  ratio job / encoder alone at batch {best}: {job_fps / alone_fps:.2f}")

        if args.skip_memory:
            return
        tiny = save_tower(scratch / "tiny", "tiny")
        peaks = {}
        for minutes in (1, 30):
            video = loop_clip(CLIP, scratch / f"loop_{minutes}min.mkv", minutes * 60)
            peaks[minutes] = peak_rss_of_job(video, tiny, scratch / f"mem_{minutes}")
        print(f"peak RSS of the job at 1 frame/s: 1-minute video {peaks[1]:.2f} GiB, 30-minute video {peaks[30]:.2f} GiB, "
              f"ratio {peaks[30] / peaks[1]:.2f}")


if __name__ == "__main__":
    main()
