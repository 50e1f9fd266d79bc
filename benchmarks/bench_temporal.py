"""Temporal merging (HoliTom) against per-frame PruMerge: tokens and bytes per minute of video, and its cost.

One job run per input set, ``--method prumerge,prumerge+,holitom:0.1,holitom:0.25`` (all four from one encoder
forward per frame, each written to ``WORK/out/<set>/<spec>/``, emptied first), in-process through `pipeline.run.run` (an
embedded Ray), with the real trained ViT-Ti/16 (``--model``, default ``../shared/models/vit-tiny-patch16-224``,
read from there, never copied; 196 patches per frame, hidden 192, layer -2, importance ``cls``). Input sets:

* ``real``: the tests' 13 real clips (``tests/data/videos``, most of them 0.1-13 s long, one corrupted),
  ``--num-frames 16`` (a clip with fewer frames gives what it has);
* ``long``: a generated 5-minute 320x240 10-fps H.264 clip of mostly static content, made with PyAV in
  ``WORK`` once (a few seconds): a real picture (a frame of ``flipping_a_pancake.mkv``) as background, a small
  disc (radius 10 px) circling on it (radius 50 px, one lap per minute), and one scene cut to another real
  picture (a frame of ``nasa_13013.mp4``) at 40 % of the clip (120 s); sampled ``--fps 1 --max-frames 64``
  (64 frames 4.7 s apart). The cut is not at half-way on purpose: with the job's default
  ``--segment-frames 32`` the 64 frames form two HoliTom segments meeting at 150 s, and a cut there would be
  split by the segmentation, not by HoliTom; at 120 s it falls inside the first segment.

Printed, measured side by side:

1. From the job's outputs (read back with `pipeline.reader.TokenReader`), per set and method: videos, minutes of
   video (each video's ``source_info.duration_s``), frames covered, rows (HoliTom: one per temporal window),
   tokens; tokens per frame and the share of the frames' patches kept (tokens / (frames x 196): the
   retention achieved; PruMerge's merged extra token counted); tokens per minute and shard bytes (the
   method's committed Parquet files) per minute; HoliTom windows per video and mean window length (frames).
   Then each video's HoliTom windows (frames per window, and for the long clip their times, against the cut).
   Then the encoder forwards: the images that entered the tower's patch embedding (a counting hook on the
   job's encoder stage) against the frames sampled and encoded: one per frame, whatever the number of methods.
2. Cost of the reduction against the encoder, in-process (no Ray, torch threads ``--threads``, default 2): for
   each clip, its sampled frames as the job decodes them, the `VisionEncoder` forward (one per segment of
   ``--segment-frames`` frames, as the job batches them with a temporal method) against `holitom` at 0.1 and
   0.25 (each segment reduced together, the job's parameters) and `prumerge` / ``prumerge+`` on the same
   encoder output; after a warm-up, ``--repeats`` rounds timing each of the five once in turn (on a shared
   machine a load change then hits all of them alike), the median of each; ms per frame and % of the
   encoder's time, per clip, per set and overall (sums of the clips' medians). Then, per segment, HoliTom's
   structure computed on that encoder output: its windows, each window's static positions, the static merge's
   saving as a share of the segment's patches, and the adjusted ratio r' at 0.1 and 0.25.

Read: tokens/min and kB/min per method (the long static clip is where temporal merging should pay: HoliTom's
tokens per minute against PruMerge's), the retention achieved (HoliTom lands at about 10 % / 25 %, below
when the static merge alone saves more than 1 - R of a segment: r' = 1 then, and nothing else is dropped;
PruMerge's depends on the content, and PruMerge+ keeps every patch of a frame whose outliers exceed 1/6 of
them: its step int(int(1/ratio)/3) is then 1), the long clip's windows (does HoliTom cut at 120 s, and how
few windows hold the static stretches), "images into tower = frames encoded" (one forward per frame for four
methods), and HoliTom's time as a share of the encoder's. The real clips are mostly 1-second clips sampled at
up to 16 frames, so their per-minute figures are far above a typical sampling's: compare methods within a set.
Timings on a busy machine move by tens of percent between clips of the same size: read the per-set and
overall rows.

    python benchmarks/bench_temporal.py --work /tmp/bt16                        # the real ViT-Ti/16
    python benchmarks/bench_temporal.py --work /tmp/bt-smoke --model /tmp/t15/clip --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.encode import VisionEncoder  # noqa: E402
from operators.frames import frame_rows  # noqa: E402
from operators.holitom import holitom, partition, static_reach, window_savings  # noqa: E402
from operators.methods import HOLITOM_DEFAULTS, parse_methods  # noqa: E402
from operators.prumerge import prumerge  # noqa: E402
from operators.towers import describe_tower  # noqa: E402
from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.inputs import filesystem_and_path  # noqa: E402
from pipeline.reader import TokenReader, VideoTokens  # noqa: E402
from pipeline.run import RunSummary, run  # noqa: E402
from pipeline.decoder import frame_request  # noqa: E402
from pipeline.encoder import EncodeTokens  # noqa: E402

MODEL = ROOT.parent / "shared" / "models" / "vit-tiny-patch16-224"
VIDEOS = ROOT / "tests" / "data" / "videos"
METHODS = "prumerge,prumerge+,holitom:0.1,holitom:0.25"
RETENTIONS = (0.1, 0.25)
PER_FRAME = ("prumerge", "prumerge+")

# The long clip: seconds, frame rate, size, where the cut is (share of the clip), the two pictures
LONG_SECONDS, LONG_FPS, LONG_SIZE, LONG_CUT = 300, 10, (320, 240), 0.4
PICTURES = (("flipping_a_pancake.mkv", 150), ("nasa_13013.mp4", 100))


class CountingEncodeTokens(EncodeTokens):
    """The job's encoder stage, appending the images entering the tower's patch embedding (once per forward)
    to ``<output>.forwards``."""

    def __init__(self, config, preprocessing, threads=None) -> None:
        super().__init__(config, preprocessing, threads)

        def count(module, inputs) -> None:
            with open(f"{config.output}.forwards", "a") as log:
                log.write(f"{len(inputs[0])}\n")

        self.encoder.model.embeddings.register_forward_pre_hook(count)


# Ray's workers cannot import this script (it runs as __main__): they get the class itself
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class InputSet:
    name: str
    folder: Path
    sampling: dict  # EncodeConfig fields
    label: str


# ---------------------------------------------------------------- the long clip


def picture(path: Path, index: int, size: tuple[int, int]) -> np.ndarray:
    """Decoded frame ``index`` of ``path`` scaled to ``size`` (w, h), ``[H, W, 3]`` uint8 RGB."""
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number == index:
                return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    raise ValueError(f"{path} has fewer than {index + 1} frames")


def make_long_clip(folder: Path) -> tuple[Path, float]:
    """The long mostly-static clip in ``folder`` (made once; see the module docstring) and the cut's time (s)."""
    width, height = LONG_SIZE
    cut_s = LONG_CUT * LONG_SECONDS
    path = folder / f"static_{LONG_SECONDS}s_{LONG_FPS}fps_{width}x{height}_cut{cut_s:g}s.mp4"
    if path.exists():
        return path, cut_s
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scenes = [picture(VIDEOS / name, index, LONG_SIZE) for name, index in PICTURES]
    radius, orbit, lap_s = 10, 50, 60.0
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = xx**2 + yy**2 <= radius**2
    colour = np.array([255, 140, 0], dtype=np.uint8)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=LONG_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": str(10 * LONG_FPS)}
        for number in range(LONG_SECONDS * LONG_FPS):
            seconds = number / LONG_FPS
            pixels = scenes[seconds >= cut_s].copy()
            angle = 2 * math.pi * seconds / lap_s
            x = int(width / 2 + orbit * math.cos(angle)) - radius
            y = int(height / 2 + orbit * math.sin(angle)) - radius
            pixels[y:y + 2 * radius + 1, x:x + 2 * radius + 1][disc] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    print(f"made {path} ({LONG_SECONDS} s, {LONG_SECONDS * LONG_FPS} frames, {path.stat().st_size / 1e6:.2f} MB) "
          f"in {time.perf_counter() - started:.1f} s")
    return path, cut_s


# ---------------------------------------------------------------- part 1: the job


def name_of(video: VideoTokens) -> str:
    return Path(filesystem_and_path(video.source_path)[1]).name


def shard_bytes(reader: TokenReader) -> int:
    return sum(Path(filesystem_and_path(path)[1]).stat().st_size for path in reader.files)


def run_job(input_set: InputSet, model: Path, output: Path, segment_frames: int) -> tuple[RunSummary, list[int]]:
    """The job with all four methods on ``input_set`` into a fresh ``output``; its summary and forward sizes."""
    forwards = Path(f"{output}.forwards")
    if output.exists():
        shutil.rmtree(output)
    forwards.unlink(missing_ok=True)
    config = EncodeConfig(input=str(input_set.folder), output=str(output), model=str(model), method=METHODS,
                          segment_frames=segment_frames, **input_set.sampling)
    started = time.perf_counter()
    summary = run(config, encoder_stage=CountingEncodeTokens)
    print(f"job on {input_set.name} ({input_set.label}): {time.perf_counter() - started:.1f} s; "
          + "; ".join(summary.lines()[:3]))
    counts = [int(line) for line in forwards.read_text().split()] if forwards.exists() else []
    return summary, counts


def method_stats(output: Path) -> dict:
    """One method's output: per video (name → frames, rows, tokens, duration, window spans), and totals."""
    reader = TokenReader(str(output))
    videos = {}
    for video_id in reader.video_ids():
        video = reader.load(video_id)
        videos[name_of(video)] = {
            "frames": sum(len(frame.frame_indices) for frame in video.frames),
            "rows": len(video.frames),
            "tokens": video.num_tokens,
            "duration_s": float(video.source_info.get("duration_s") or 0.0),
            "sampled": int(video.source_info.get("sampled_frames") or 0),
            "windows": [(frame.timestamps[0], frame.timestamps[-1], len(frame.frame_indices))
                        for frame in video.frames],
        }
    grid = reader.metadata["patch_grid"] if reader.metadata else (0, 0)
    return {"videos": videos, "bytes": shard_bytes(reader), "patches": grid[0] * grid[1]}


def print_job_tables(results: dict, sets: list[InputSet], cut_s: float) -> None:
    specs = [spec.text for spec in parse_methods(METHODS)]
    print("\n== 1. The job's outputs: tokens and bytes per minute of video, retention, windows ==")
    header = (f"{'set':<6}{'method':<14}{'videos':>7}{'minutes':>9}{'frames':>8}{'rows':>7}{'tokens':>9}"
              f"{'tok/frame':>11}{'kept %':>8}{'tokens/min':>12}{'kB/min':>10}{'win/video':>11}{'frames/win':>12}")
    print(header)
    print("-" * len(header))
    for input_set in sets:
        for spec in specs:
            stats = results[input_set.name]["methods"][spec]
            videos = stats["videos"].values()
            minutes = sum(v["duration_s"] for v in videos) / 60
            frames = sum(v["frames"] for v in videos)
            rows = sum(v["rows"] for v in videos)
            tokens = sum(v["tokens"] for v in videos)
            temporal = spec.startswith("holitom")
            windows = f"{rows / len(videos):.1f}" if temporal else "-"
            length = f"{frames / rows:.1f}" if temporal else "1"
            print(f"{input_set.name:<6}{spec:<14}{len(videos):>7}{minutes:>9.2f}{frames:>8}{rows:>7}{tokens:>9}"
                  f"{tokens / frames:>11.1f}{100 * tokens / (frames * stats['patches']):>8.1f}"
                  f"{tokens / minutes:>12.0f}{stats['bytes'] / 1e3 / minutes:>10.1f}{windows:>11}{length:>12}")
        print("-" * len(header))
    holitoms = [spec for spec in specs if spec.startswith("holitom")]
    print("tokens include PruMerge's merged extra token; kept % = tokens / (frames x patches per frame); "
          "kB/min = the method's committed shard bytes / minutes")

    print("\nHoliTom windows per video (frames per window, in time order)")
    for input_set in sets:
        per_spec = {spec: results[input_set.name]["methods"][spec]["videos"] for spec in holitoms}
        names = sorted(per_spec[holitoms[0]])
        for name in names:
            first = per_spec[holitoms[0]][name]
            cells = "  ".join(f"{spec}: {len(per_spec[spec][name]['windows'])} windows "
                              f"[{'+'.join(str(w[2]) for w in per_spec[spec][name]['windows'])}]"
                              for spec in holitoms if name in per_spec[spec])
            print(f"  {input_set.name:<5}{name[:34]:<35}{first['duration_s']:7.1f} s {first['frames']:3d} frames  "
                  f"{cells}")
        if input_set.name == "long":
            for spec in holitoms:
                for name in names:
                    spans = ", ".join(f"{a:.0f}-{b:.0f} s ({n})" for a, b, n in per_spec[spec][name]["windows"])
                    print(f"  long {spec} windows (first-last frame time, frames), cut at {cut_s:.0f} s: {spans}")

    print("\nEncoder forwards per job run (4 methods from one forward per frame)")
    header = f"{'set':<6}{'frames sampled':>16}{'frames encoded':>16}{'images into tower':>19}{'forwards':>10}" \
             f"{'images/frame':>14}"
    print(header)
    print("-" * len(header))
    for input_set in sets:
        result = results[input_set.name]
        videos = result["methods"][specs[0]]["videos"].values()
        sampled = sum(v["sampled"] for v in videos)
        encoded, counts = result["summary"].frames, result["forwards"]
        ratio = sum(counts) / encoded if encoded else float("nan")
        print(f"{input_set.name:<6}{sampled:>16}{encoded:>16}{sum(counts):>19}{len(counts):>10}{ratio:>14.2f}")


# ---------------------------------------------------------------- part 2: the stage's cost


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function: one warm-up call each, then ``repeats`` rounds timing each once in
    turn (on a shared machine a load change then hits every function alike, not one of them)."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {key: [] for key in functions}
    for _ in range(repeats):
        for key, function in functions.items():
            start = time.perf_counter()
            function()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def segment_structure(features: torch.Tensor) -> dict:
    """HoliTom's windows of one segment ``[F, N, C]`` (the job's tau), each window's static positions, the
    saving's share of the F·N patches, and the adjusted ratio r' at each of `RETENTIONS` (1: capped)."""
    frames, patches = features.shape[:2]
    reach = static_reach(features.float(), HOLITOM_DEFAULTS["tau"])
    windows, saving = partition(window_savings(reach).tolist(), frames)
    static = [int((reach[s] >= e).sum()) if e > s else 0 for s, e in windows]
    ratios = [min(r * frames * patches / (frames * patches - saving), 1.0) for r in RETENTIONS]
    return {"frames": frames, "windows": [e - s + 1 for s, e in windows], "static": static,
            "saving": saving / (frames * patches), "ratios": ratios}


def clip_pixels(config: EncodeConfig, tower, path: Path) -> torch.Tensor | None:
    """The normalised views ``[F, 3, S, S]`` the job feeds the tower for ``path`` (None: no frame decoded)."""
    preprocessing = config.preprocessing(tower)
    rows = [row for row in frame_rows(frame_request(config, preprocessing, str(path))) if row["kind"] == "frame"]
    if not rows:
        return None
    return preprocessing.normalize(torch.from_numpy(np.concatenate([row["pixels"] for row in rows])))


@torch.inference_mode()
def time_stages(sets: list[InputSet], model: Path, segment_frames: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    tower = describe_tower(str(model))
    encoder = VisionEncoder(str(model), device="cpu")
    columns = [f"holitom:{r:g}" for r in RETENTIONS] + list(PER_FRAME)
    print(f"\n== 2. Reduction cost against the encoder (in-process, CPU float32, torch threads "
          f"{torch.get_num_threads()}, median of {repeats}, encoder batch = reduction segment = up to "
          f"{segment_frames} frames) ==")
    header = f"{'set':<6}{'clip':<26}{'frames':>7}{'encoder':>10}" + "".join(f"{c:>20}" for c in columns)
    print(header + "\n" + f"{'':<39}{'ms/frame':>10}" + "".join(f"{'ms/frame (% enc)':>20}" for _ in columns))
    print("-" * len(header))
    overall = {"frames": 0, "encoder": 0.0, **{c: 0.0 for c in columns}}
    structures = []
    for input_set in sets:
        config = EncodeConfig(input="x", output="y", model=str(model), method=METHODS, segment_frames=segment_frames,
                              **input_set.sampling).for_tower(tower)
        totals = {"frames": 0, "encoder": 0.0, **{c: 0.0 for c in columns}}
        for path in sorted(input_set.folder.iterdir()):
            pixels = clip_pixels(config, tower, path)
            if pixels is None:
                print(f"{input_set.name:<6}{path.name[:25]:<26}{'no frames':>7}")
                continue
            chunks = list(pixels.split(segment_frames))
            outs = [encoder(chunk) for chunk in chunks]
            functions = {"encoder": lambda: [encoder(chunk) for chunk in chunks]}
            for retention in RETENTIONS:
                functions[f"holitom:{retention:g}"] = lambda r=retention: [
                    holitom(o.features, o.importance, r, **HOLITOM_DEFAULTS) for o in outs]
            for mode in PER_FRAME:
                functions[mode] = lambda m=mode: [
                    prumerge(o.features, o.keys, o.importance, mode=m, k_neighbors=config.k_neighbors) for o in outs]
            seconds = interleaved_medians(functions, repeats)
            structures.extend((input_set.name, path.name, index, segment_structure(o.features))
                              for index, o in enumerate(outs))
            frames = len(pixels)
            print(row_line(input_set.name, path.name, frames, seconds, columns))
            for key in totals:
                totals[key] += frames if key == "frames" else seconds[key]
        print(row_line(input_set.name, "ALL", totals["frames"], totals, columns))
        print("-" * len(header))
        for key in overall:
            overall[key] += totals[key]
    print(row_line("all", "ALL (both sets)", overall["frames"], overall, columns))

    print(f"\nHoliTom per segment (computed here on the encoder output; tau {HOLITOM_DEFAULTS['tau']}): windows "
          f"(frames each), static positions of each window (of {tower.grid_size ** 2}), the static merge's saving "
          f"as a share of the segment's patches, and the adjusted ratio r' = min(R / (1 - saving), 1) at R = "
          + ", ".join(f"{r:g}" for r in RETENTIONS) + " (r' = 1: the budget exceeds what is left after the static "
          "merge, so fewer than R of the patches are kept)")
    for set_name, clip, index, found in structures:
        ratios = "  ".join(f"r'({r:g}) {ratio:.2f}" for r, ratio in zip(RETENTIONS, found["ratios"]))
        print(f"  {set_name:<5}{clip[:25]:<26}seg {index} ({found['frames']:2d} frames)  saving "
              f"{100 * found['saving']:5.1f}%  {ratios}  windows [{'+'.join(map(str, found['windows']))}]  "
              f"static [{' '.join(map(str, found['static']))}]")


def row_line(set_name: str, clip: str, frames: int, seconds: dict, columns: list[str]) -> str:
    encoder = seconds["encoder"]
    cells = "".join(f"{1e3 * seconds[c] / frames:>11.2f} ({100 * seconds[c] / encoder:4.1f}%)" for c in columns)
    return f"{set_name:<6}{clip[:25]:<26}{frames:>7}{1e3 * encoder / frames:>10.2f}{cells}"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL, help=f"vision tower (default {MODEL})")
    parser.add_argument("--work", type=Path, required=True, help="folder for the long clip and the job outputs")
    parser.add_argument("--videos", type=Path, default=VIDEOS, help=f"the real clips (default {VIDEOS})")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per real clip (default 16)")
    parser.add_argument("--long-fps", type=float, default=1.0, help="long clip: --fps (default 1)")
    parser.add_argument("--long-max-frames", type=int, default=64, help="long clip: --max-frames (default 64)")
    parser.add_argument("--segment-frames", type=int, default=32, help="the job's --segment-frames (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, part 2 (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, part 2 (default 2)")
    parser.add_argument("--skip-job", action="store_true", help="part 2 only")
    parser.add_argument("--skip-timing", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no checkpoint there (config.json missing); the real ViT-Ti/16 lives at "
                     f"{MODEL}, or pass a tower folder")
    work = args.work.resolve()
    long_folder = work / "long-input"
    _, cut_s = make_long_clip(long_folder)
    sets = [
        InputSet("real", args.videos.resolve(), {"num_frames": args.num_frames}, f"--num-frames {args.num_frames}"),
        InputSet("long", long_folder, {"fps": args.long_fps, "max_frames": args.long_max_frames},
                 f"--fps {args.long_fps:g} --max-frames {args.long_max_frames}"),
    ]
    tower = describe_tower(str(args.model))
    print(f"model {args.model} ({tower.grid_size ** 2} patches per frame), methods {METHODS}, "
          f"segment frames {args.segment_frames}; sets: " + "; ".join(f"{s.name} = {s.folder} {s.label}" for s in sets))

    if not args.skip_job:
        results = {}
        for input_set in sets:
            output = work / "out" / input_set.name
            summary, counts = run_job(input_set, args.model.resolve(), output, args.segment_frames)
            methods = {spec.text: method_stats(output / spec.dirname) for spec in parse_methods(METHODS)}
            results[input_set.name] = {"summary": summary, "forwards": counts, "methods": methods}
        ray.shutdown()  # its idle processes would share the CPUs with the timing below
        print_job_tables(results, sets, cut_s)
    if not args.skip_timing:
        time_stages(sets, args.model.resolve(), args.segment_frames, args.repeats, args.threads)


if __name__ == "__main__":
    main()
