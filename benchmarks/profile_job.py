"""Where the job's CPU goes, next to the naive baseline on the same inputs.

Runs `naive_baseline.py`, then `jobs/encode_videos.py` (embedded local Ray, PruMerge), on the
decodable test clips (``tests/data/videos``) linked to ``--videos`` distinct names, each as a fresh process. While each
runs, every process's CPU time is read from ``/proc`` twice a second; at the end the CPU seconds
are grouped by role (the baseline is one process; the job is the encode actor, the decode/plan/
write task workers, the driver, and Ray's own services):

    python benchmarks/profile_job.py                      # ViT-B/14-336-sized random tower, bf16

With ``--py-spy FILE``, the job runs under ``py-spy record --subprocesses`` instead (py-spy comes
with ``ray[default]``); its collapsed stacks go to FILE (flamegraph.pl input) and the samples are
attributed to pipeline stages. Sampling a dozen processes slows the job down (about 1.7x here), so
take the stage shares from it, not the timings.

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_end_to_end import link_inputs  # noqa: E402
from procfs import process_stats  # noqa: E402
from towers import TOWERS, save_tower  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# (stage, markers) for py-spy stacks: a sample belongs to the first stage one of whose markers
# matches a frame of its stack; a marker is (function name prefix, part of the file path), and a
# py-spy frame reads "name (path:line)".
STAGES = [
    ("PruMerge", [("", "operators/prumerge.py")]),
    ("CLIP forward", [("", "operators/encode.py")]),
    ("normalize (uint8 -> model input)", [("normalize", "operators/preprocess.py")]),
    ("encode actor: Arrow rows", [("_units", "pipeline/encoder.py"), ("", "pipeline/schema.py")]),
    ("probe + plan", [("", "operators/timeline.py"), ("", "pipeline/plan.py")]),
    ("decode (PyAV)", [("", "operators/decode.py"), ("", "operators/seek.py")]),
    ("resize / crop / tiles", [("", "operators/preprocess.py"), ("", "operators/tiles.py")]),
    ("Parquet write", [("", "pipeline/sink.py")]),
    ("model loading", [("from_pretrained", "")]),
    ("imports (process start-up)", [("_find_and_load", "")]),
    ("idle Ray worker (waits for a task)", [("Worker.main_loop", "")]),
]
OTHER = "Ray / Python other (incl. waits)"


def stage_of(stack: str) -> str:
    frames = [(name, path) for name, _, path in (frame.partition(" (") for frame in stack.split(";"))]
    for stage, markers in STAGES:
        for function, file in markers:
            if any(name.startswith(function) and file in path for name, path in frames):
                return stage
    return OTHER


def samples_by_stage(raw: Path) -> collections.Counter:
    """Collapsed stacks (``frame;frame;... count`` per line) → samples per stage."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[stage_of(stack)] += int(count)
    return counts


def process_table() -> dict[int, tuple[float, str]]:
    """pid → (CPU seconds so far, process title) for every process on the machine."""
    table = {}
    for pid, fields in process_stats().items():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        table[pid] = ((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, title.strip())  # utime + stime
    return table


SERVICE_ACTORS = ("ray::_", "ray::ActorLocationTracker", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def role(titles: set[str]) -> str:
    """The part a process plays in the job, from the titles it was seen with (Ray retitles workers)."""
    if any("naive_baseline.py" in t for t in titles):
        return "baseline process (decode, preprocess, CLIP, PruMerge, pandas)"
    if any("encode_videos.py" in t for t in titles):
        return "driver (plan, Ray Data executor, shard commit)"
    if any("EncodeTokens" in t for t in titles):
        return "encode actor (normalize, CLIP, PruMerge)"
    if any(t.startswith(SERVICE_ACTORS) for t in titles) or not any(t.startswith("ray::") for t in titles):
        return "Ray services (GCS, raylet, dashboard, agents, system actors)"
    return "task workers (probe, decode, write)"


def cpu_by_role(command: list[str], log: Path) -> tuple[float, collections.Counter]:
    """Run ``command`` (stderr to ``log``); (wall seconds, CPU seconds per role) of the processes it started."""
    before = process_table()
    cpu: dict[int, float] = {}
    titles: dict[int, set[str]] = collections.defaultdict(set)
    started = time.perf_counter()
    with log.open("w") as stderr:  # a file, not a pipe: nobody reads a pipe while this loop polls
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    while process.poll() is None:
        for pid, (seconds, title) in process_table().items():
            if pid in before or pid == os.getpid():
                continue
            cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            if title:
                titles[pid].add(title)
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"{command[1]} failed:\n{log.read_text()[-3000:]}")
    by_role: collections.Counter = collections.Counter()
    for pid, seconds in cpu.items():
        by_role[role(titles[pid])] += seconds
    return wall, by_role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="vit-b14")
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--num-frames", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--py-spy", type=Path, help="profile the job with py-spy; collapsed stacks go here")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    args = parser.parse_args()

    frames = args.videos * args.num_frames
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        inputs = link_inputs(scratch / "videos", args.videos)
        common = ["--input", str(inputs), "--model", str(save_tower(scratch / "tower", args.tower)),
                  "--num-frames", str(args.num_frames), "--dtype", args.dtype]
        job = [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), *common, "--output", str(scratch / "job")]
        if args.py_spy:
            subprocess.run(["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", str(args.rate),
                            "--output", str(args.py_spy), "--", *job], check=True, capture_output=True)
            counts = samples_by_stage(args.py_spy)
            total = sum(counts.values())
            print(f"job under py-spy: {args.videos} videos x {args.num_frames} frames, {args.tower} {args.dtype}")
            print(f"{'stage':<44}{'samples':>9}{'share':>8}")
            for stage, samples in counts.most_common():
                print(f"{stage:<44}{samples:>9}{samples / total:>8.1%}")
            return
        baseline = [sys.executable, str(ROOT / "benchmarks" / "naive_baseline.py"), *common,
                    "--output", str(scratch / "baseline")]
        runs = {"baseline": cpu_by_role(baseline, scratch / "baseline.log"), "job": cpu_by_role(job, scratch / "job.log")}

    print(f"{args.videos} videos x {args.num_frames} frames ({frames} frames), {args.tower} {args.dtype}, "
          f"{os.cpu_count()} cores")
    for name, (wall, by_role) in runs.items():
        total = sum(by_role.values())
        print(f"{name}: wall {wall:.1f} s ({frames / wall:.2f} frames/s), CPU {total:.1f} s "
              f"({total / wall:.2f} cores busy), {1000 * total / frames:.0f} CPU ms/frame")
        for group, seconds in by_role.most_common():
            print(f"  {group:<62}{seconds:8.1f} CPU s {seconds / total:7.1%}")


if __name__ == "__main__":
    main()
