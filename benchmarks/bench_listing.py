"""Driver cost of many inputs: listing and planning time, and the driver's peak memory, at 100,000 inputs.

Makes ``--inputs`` hard links (distinct files to the job, a few copies' bytes on disk) to a short
real clip (``tests/data/videos/video_0.mov``, 1 s), 1,000 per folder (one copy of the clip each: a file
holds at most ~65,000 links), then runs the real job twice into one
output, each run in a fresh process with the tiny random tower and ``--num-frames 1``: the first encodes
every input, the second finds everything committed (resume) and encodes nothing. For each run it prints

- ``listing_s``: `pipeline.inputs.list_inputs` on the input root (walk, real paths, ids);
- ``planning_s``: reading what the output holds (`read_state`) and choosing what to do (`input_rows`);
- ``job_s``: the whole job (it lists and plans again, then runs the graph);
- ``driver_peak_mb``: the driver process's peak resident memory over all of it (``ru_maxrss``).

    python benchmarks/bench_listing.py                      # 100,000 inputs (the first run takes a while)
    python benchmarks/bench_listing.py --inputs 2000 --workdir /tmp/bench-listing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP = ROOT / "tests" / "data" / "videos" / "video_0.mov"
PER_FOLDER = 1000


def make_inputs(root: Path, copies: Path, count: int) -> None:
    copies.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        folder, copy = root / f"{index // PER_FOLDER:04d}", copies / f"{index // PER_FOLDER:04d}.mov"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CLIP, copy)
        os.link(copy, folder / f"{index:06d}.mov")


def measure(root: str, output: str, model: str) -> dict:
    """One run, in this (fresh) process: listing and planning timed alone, then the whole job."""
    from pipeline.config import EncodeConfig
    from pipeline.inputs import filesystem_and_path, list_inputs
    from pipeline.plan import input_rows
    from pipeline.run import run
    from pipeline.state import read_state

    started = time.perf_counter()
    listing = list_inputs(root, "video")
    listed = time.perf_counter()
    rows = input_rows(listing.items, [read_state(*filesystem_and_path(output))], 1)
    planned = time.perf_counter()
    summary = run(EncodeConfig(input=root, output=output, model=model, num_frames=1, batch_size=64,
                               log_level="WARNING"))
    return {
        "inputs": len(listing.items),
        "to_encode": len(rows),
        "listing_s": round(listed - started, 2),
        "planning_s": round(planned - listed, 2),
        "job_s": round(time.perf_counter() - planned, 1),
        "encoded": summary.encoded,
        "skipped": summary.skipped,
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--workdir", help="where the links, tower and output go (default: a temporary folder)")
    parser.add_argument("--measure", nargs=3, metavar=("ROOT", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    from benchmarks.towers import save_tower

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        root, output = work / "inputs", work / "out"
        if not root.exists():
            make_inputs(root, work / "copies", args.inputs)
        model = save_tower(work / "tower", "tiny")
        for label in ("first run (encodes every input)", "second run (everything committed)"):
            result = subprocess.run([sys.executable, __file__, "--measure", str(root), str(output), str(model)],
                                    capture_output=True, text=True, check=True)
            print(f"{label}: {result.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
