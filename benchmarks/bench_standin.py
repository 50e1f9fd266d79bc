"""Does the graph keep a GPU-class encoder fed? The real job, with only the encoder made fast, against the
machine's decode-only limit.

The stand-in (`GpuClassStandIn`) is the job's own `pipeline.encoder.EncodeTokens` with its device work
(`EncodeTokens.reduce`: one tower forward and PruMerge) replaced by a sleep of ``--ms-per-view`` per view
(1 ms: an H100 runs CLIP ViT-L/14-336, ~382 GFLOP per view, at ~1,000 views/s at a realistic 40 % of its
bf16 peak) that returns what PruMerge returns for ViT-L/14-336 (33 tokens of 1024 values per view; the
paper keeps ~5.5 % of 576 patches, plus the merged extra token). Everything else is the real job: listing,
the decoder actor pool, Ray Data's blocks, object store and back-pressure, the encoder actor's host work
(batching, the Arrow table), the shard sink's Parquet writes and commits. Ray is started with one GPU
declared (the only thing faked), so the job sizes its actors as on a GPU node: one encoder actor holding
the GPU and no CPU, a decoder on every CPU.

The decode-only limit: the job's decode stage (`operators.frames.frame_rows`: probe, sample, decode at
the model's size, crop) alone on every CPU of this machine (one process per CPU, each taking the next
input), over the same inputs.

Inputs: ``--videos`` hard links (each its own input) to the 1080p clips of `hd_clips` (60 s, H.264,
B-frames, a key frame every 5 s), 8 uniform frames each. Printed: frames/s of both (the job's from the
stand-in's first batch to its last: the steady state, without Ray's actor start-up, which is printed
beside it), their ratio, the stand-in's host CPU per frame (its calls' thread CPU time; the sleep costs
none) and how busy its one "GPU" was. The last line is ``standin_vs_decode_limit=Z``.

With a slow stand-in (``--ms-per-view 250``) the encoder is the bottleneck instead, and "busy" near
100 % shows the graph has the next batch ready whenever one ends.

    python benchmarks/bench_standin.py            # 64 videos (512 frames) per side
    python benchmarks/bench_standin.py --quick    # 32 videos
    python benchmarks/bench_standin.py --videos 16 --ms-per-view 250
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hd_clips import make_clip  # noqa: E402
from operators.frames import FrameRequest, frame_rows  # noqa: E402
from operators.preprocess import Preprocessing  # noqa: E402
from operators.methods import ReducedRows  # noqa: E402
from operators.sampling import FrameSampling  # noqa: E402
from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.schema import encoded_schema, shard_schema  # noqa: E402
from pipeline.encoder import EncodeTokens  # noqa: E402

TOKENS_PER_VIEW = 33
HIDDEN = 1024
STATS_ENV = "BENCH_STANDIN_STATS"  # the file where each stand-in call appends "done_at_s host_cpu_s frames"


class GpuClassStandIn(EncodeTokens):
    """`EncodeTokens` whose device work costs ``--ms-per-view`` of sleep per view (see the module docstring)."""

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing,
                 threads: int | None = None) -> None:  # no tower: the host side only
        self.config = config
        self.specs = config.methods()  # one per-frame method: `reduce` answers for it alone
        self.shard = shard_schema(HIDDEN)
        self.schema = encoded_schema(self.shard)
        self.seconds_per_view = float(os.environ.get("BENCH_STANDIN_MS_PER_VIEW", "1.0")) / 1000
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randn(TOKENS_PER_VIEW, HIDDEN, generator=generator).to(torch.float16)
        self.positions = torch.arange(TOKENS_PER_VIEW, dtype=torch.int64)
        self.scores = torch.full((TOKENS_PER_VIEW,), 1.0 / TOKENS_PER_VIEW)
        self.device = threading.Lock()

    def reduce(self, images: torch.Tensor, view_frames: list[int], todo: list[list[list[int]]]) -> list[ReducedRows]:
        with self.device:  # one batch at a time, as on one GPU; the other batch in flight does its host work
            time.sleep(self.seconds_per_view * len(images))
        count = len(images)
        own = [torch.full((TOKENS_PER_VIEW,), frame, dtype=torch.int64) for frame in view_frames]
        frames = sorted(set(view_frames))  # a frame's views are consecutive
        return [ReducedRows([[frame] for frame in frames], [view_frames.count(frame) for frame in frames],
                            [self.tokens] * count, [self.positions] * count, [self.scores] * count, own, own)]

    def __call__(self, batch):
        started_cpu = time.thread_time()
        table = super().__call__(batch)
        host_cpu = time.thread_time() - started_cpu  # this call's thread; the sleep costs no CPU
        frames = int(sum(len(numbers) for kind, numbers in zip(batch["kind"], batch["frame_index"]) if kind == "segment"))
        with open(os.environ[STATS_ENV], "a") as stats:  # one line per batch: when it was done, its host CPU, frames
            stats.write(f"{time.time()} {host_cpu} {frames}\n")
        return table


def _decode_one(path: str) -> int:
    request = FrameRequest(path=path, sampling=FrameSampling(num_frames=8))
    return sum(1 for row in frame_rows(request) if row["kind"] == "frame")


def decode_limit(paths: list[str], processes: int) -> float:
    """Frames/s of the job's decode stage alone, one process per CPU, each taking the next input."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_one, paths[:processes])  # start-up and library loading, not counted
        started = time.perf_counter()
        frames = sum(pool.imap_unordered(_decode_one, paths, chunksize=1))
        return frames / (time.perf_counter() - started)


def standin_job(inputs: Path, output: Path, model: Path, cpus: int) -> tuple[int, float]:
    """(frames, wall s) of the real job with the stand-in encoder, on a Ray with ``cpus`` CPUs and 1 GPU."""
    import ray

    from pipeline.run import run

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no progress lines
    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        config = EncodeConfig(input=str(inputs), output=str(output), model=str(model), num_frames=8, device="cuda",
                              log_level="WARNING")
        started = time.perf_counter()
        summary = run(config, encoder_stage=GpuClassStandIn)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    return summary.frames, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 videos instead of 64")
    parser.add_argument("--videos", type=int, help="inputs per side (default 64, --quick 32)")
    parser.add_argument("--ms-per-view", type=float, default=1.0, help="the stand-in encoder's device time per view")
    parser.add_argument("--workdir", default="/tmp/bench-hd-clips", help="where the 1080p clips are made (kept)")
    args = parser.parse_args()
    videos = args.videos or (32 if args.quick else 64)
    cpus = os.cpu_count() or 1

    clips = [make_clip(Path(args.workdir), 1920, 1080, variant=v) for v in range(3)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-standin-"))
    try:
        inputs = scratch / "inputs"
        inputs.mkdir()
        for index in range(videos):  # hard links: distinct inputs, no copies
            os.link(clips[index % len(clips)], inputs / f"v{index:04d}.mp4")
        model = scratch / "vit-l-14-336-config"  # the job reads the tower's config only; no weights
        from transformers import CLIPVisionConfig
        CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=HIDDEN, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16).save_pretrained(model)
        paths = sorted(str(p) for p in inputs.iterdir())

        print(f"{videos} inputs (1080p H.264, 60 s, key frame every 5 s), 8 uniform frames each, {cpus} CPUs")
        limit = decode_limit(paths, cpus)
        print(f"decode-only limit (the decode stage on {cpus} processes): {limit:.2f} frames/s")

        stats = scratch / "standin-stats.txt"
        os.environ[STATS_ENV] = str(stats)
        os.environ["BENCH_STANDIN_MS_PER_VIEW"] = str(args.ms_per_view)
        frames, wall = standin_job(inputs, scratch / "out", model, cpus)
        batches = np.loadtxt(stats, ndmin=2)  # [batches, 3]: done at (s), host CPU (s), frames
        batches = batches[np.argsort(batches[:, 0])]
        # steady state: frames delivered after the first batch, over the time from the first batch to the last
        rate = batches[1:, 2].sum() / (batches[-1, 0] - batches[0, 0])
        host_ms = 1000 * batches[:, 1].sum() / batches[:, 2].sum()
        busy = rate * args.ms_per_view / 1000  # share of that time the one "GPU" spent on frames
        print(f"job with the GPU-class stand-in ({args.ms_per_view:g} ms/view): {rate:.2f} frames/s from its first batch "
              f"to its last ({frames} frames; {frames / wall:.2f} frames/s over the whole run, {wall:.1f} s with Ray's "
              f"actor start-up); encoder host work {host_ms:.2f} ms CPU/frame; the 'GPU' busy {100 * busy:.1f} %")
        print(f"standin_vs_decode_limit={rate / limit:.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
