"""What the commit index costs and saves at scale (issue #13): resume planning, write statistics, readers.

Makes synthetic outputs itself (no model): shard tables in the shard schema (hidden size 32, 4 tokens
per row, one view per frame, rows sorted by key, whole frames per shard), committed with
`pipeline.index.commit_shard` and merged with `merge_index_parts`, as the job's write tasks and
driver do. Every measure runs in a fresh process, which first imports what it needs and runs the same
code on a 20-video output (first-use costs); then its peak RSS is reset to its current RSS
(``/proc/self/clear_refs``) and the measure's peak memory is the peak RSS (``VmHWM``; ``ru_maxrss``
would include this benchmark's own RSS, inherited over fork + exec) minus that baseline. The listed
inputs, which the job's driver holds anyway, are in the baseline.

1. Resume: the driver's start on an output of ``--videos`` videos × 20 frames (1 % of them with only
   their first 10 frames committed, as an interrupted run leaves them) in ~1,300 shard files:
   `prepare_output` + `input_rows` for every input, against the previous design (every shard's
   ``(video_id, frame_index)`` keys read into Python sets, as ``read_committed`` did, and the old
   ``pending_rows``). The reader's start on the same output is measured too.
2. Write statistics: the driver aggregating the ``WriteStats`` of ~1,000 write tasks for the same
   rows (`ShardSink.on_write_complete`), against the old ``WriteStats`` that also held a set of every
   ``(video_id, frame_index)`` it wrote.
3. Reader: an output of ``--reader-files`` shard files (one video of 4 frames each): `TokenReader`
   open + one `load`, in the main process and in 4 DataLoader workers (`TokenDataset`, fork and
   spawn; `TokenIterableDataset`, fork), with the shard files each worker opened, against the old
   reader's start (every footer, then every file's ``video_id`` column).

    python benchmarks/bench_commits.py --quick             # 200,000 rows and 2,000 reader files (~5 min)
    python benchmarks/bench_commits.py                     # 2,000,000 rows and 10,000 reader files
    python benchmarks/bench_commits.py --workdir /tmp/bench-commits   # keeps (and reuses) the outputs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = 32
TOKENS_PER_ROW = 4
FRAMES = 20  # sampled frames per video of the resume output
PARTIAL_EVERY = 100  # every 100th video has only its first half committed (an interrupted run)
READER_FRAMES = 4
WORKERS = 4
RUN_ID = "20261201T000000.000Z-bench0"

SIZES = {
    # videos × FRAMES rows; frames per shard file (~1,300 files); write tasks; reader files; videos per worker
    "full": {"videos": 100_000, "frames_per_shard": 1_500, "writes": 1_000, "reader_files": 10_000, "per_worker": 8},
    "quick": {"videos": 10_000, "frames_per_shard": 150, "writes": 1_000, "reader_files": 2_000, "per_worker": 8},
}


# -- synthetic outputs -----------------------------------------------------------------------------


def run_metadata(frames: int) -> dict:
    """The shape of `pipeline.run.run_metadata` for a 336-px, 14-px-patch tower of hidden size `HIDDEN`."""
    from operators.preprocess import Preprocessing
    from pipeline.inputs import VIDEO_ID_RULE

    return {
        "media": "video",
        "video_id_rule": VIDEO_ID_RULE,
        "model": "synthetic/bench-commits",
        "model_revision": "0" * 40,
        "layer": -2,
        "hidden_size": HIDDEN,
        "patch_grid": [24, 24],
        "patch_size": 14,
        "method": "prumerge",
        "method_params": {"budget": None, "k_neighbors": 32, "importance": "cls"},
        "preprocessing": {**Preprocessing().to_metadata(), "anyres": False, "pinpoints": None},
        "tower": "clip",
        "sampling": {"num_frames": frames, "fps": None, "max_frames": None},
    }


def input_names(count: int, prefix: str) -> list[tuple[str, str]]:
    """(video_id, source_path) of ``count`` inputs, ids made as the listing makes them."""
    from pipeline.inputs import canonical_uri, make_video_id

    paths = [f"/data/{prefix}/{i // 1000:04d}/{i:07d}.mp4" for i in range(count)]
    return [(make_video_id(canonical_uri("file", path)), path) for path in paths]


def shard_table(keys: list[tuple[int, int]], names: list[tuple[str, str]], sampled: int, rng):
    """Shard rows (`pipeline.schema.shard_schema`) for ``keys`` (video number, frame index), sorted by key."""
    import numpy as np
    import pyarrow as pa

    from pipeline.schema import SOURCE_INFO, ragged, shard_schema

    keys = sorted(keys, key=lambda key: (names[key[0]][0], key[1]))
    n = len(keys)
    frames = np.array([frame for _, frame in keys], dtype=np.int32)
    counts = np.full(n, TOKENS_PER_ROW)
    tokens = rng.standard_normal((n * TOKENS_PER_ROW, HIDDEN), dtype=np.float32).astype(np.float16)
    info = {"codec": "h264", "stream_index": 0, "rotation": 0, "width": 640, "height": 360, "num_frames": 600,
            "fps": 30.0, "duration_s": 20.0, "time_source": "pts", "sampled_frames": sampled, "unreadable_tail": None}
    source_info = pa.StructArray.from_arrays([pa.repeat(pa.scalar(info[f.name], f.type), n) for f in SOURCE_INFO],
                                             fields=list(SOURCE_INFO))
    schema = shard_schema(HIDDEN)
    columns = {
        "video_id": pa.array([names[v][0] for v, _ in keys], pa.string()),
        "source_path": pa.array([names[v][1] for v, _ in keys], pa.string()),
        "frame_index": pa.array(frames),
        "timestamp_s": pa.array(frames * 1.5),
        "tile_index": pa.array(np.full(n, -1, np.int16)),
        "grid_rows": pa.array(np.ones(n, np.int16)),
        "grid_cols": pa.array(np.ones(n, np.int16)),
        "num_tokens": pa.array(counts.astype(np.int32)),
        "tokens": ragged(tokens, counts, schema.field("tokens").type.value_type),
        "positions": ragged(rng.integers(0, 576, n * TOKENS_PER_ROW).astype(np.int16), counts, pa.int16()),
        "scores": ragged(rng.random(n * TOKENS_PER_ROW, dtype=np.float32), counts, pa.float32()),
        "frame_indices": ragged(frames, np.ones(n, np.int64), pa.int32()),
        "timestamps_s": ragged(frames * 1.5, np.ones(n, np.int64), pa.float64()),
        "first_frames": ragged(np.repeat(frames, TOKENS_PER_ROW), counts, pa.int32()),
        "last_frames": ragged(np.repeat(frames, TOKENS_PER_ROW), counts, pa.int32()),
        "source_info": source_info,
        "attempt": pa.array(np.ones(n, np.int32)),
    }
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def committed_keys(videos: int, frames: int) -> list[tuple[int, int]]:
    """(video, frame) of every committed frame, in listing order: every `PARTIAL_EVERY`-th video has
    only its first half."""
    return [(v, f) for v in range(videos) for f in range(frames // 2 if v % PARTIAL_EVERY == PARTIAL_EVERY - 1
                                                           else frames)]


def write_output(output: Path, names: list[tuple[str, str]], keys: list[tuple[int, int]], frames_per_shard: int,
                 metadata: dict) -> dict:
    """Commit ``keys`` in shards of ``frames_per_shard`` frames (the inputs in listing order, as write
    tasks get them; each shard sorted by key), then merge the index parts as the job's driver does."""
    import numpy as np

    from pipeline.index import commit_shard, merge_index_parts
    from pipeline.store import Store

    store = Store(str(output))
    store.make_folders("shards", "index", "errors")
    rng = np.random.default_rng(0)
    started, shards, size = time.perf_counter(), 0, 0
    for start in range(0, len(keys), frames_per_shard):
        commit = commit_shard(store, shard_table(keys[start:start + frames_per_shard], names,
                                                 metadata["sampling"]["num_frames"], rng), metadata)
        shards, size = shards + 1, size + commit.bytes
    committed = time.perf_counter()
    parts = merge_index_parts(store, RUN_ID)
    return {"rows": len(keys), "videos": len({v for v, _ in keys}), "shards": shards, "shard_mb": size / 2**20,
            "commit_s": committed - started, "merge_s": time.perf_counter() - committed, "parts": parts}


def make_output(output: Path, spec: dict, build) -> dict:
    """``build()`` into ``output`` unless a finished one of the same ``spec`` is there (``--workdir`` reuse)."""
    marker = output.with_suffix(".json")
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec and output.exists():
        return {**json.loads(marker.read_text())["made"], "reused": True}
    shutil.rmtree(output, ignore_errors=True)
    made = build()
    marker.write_text(json.dumps({"spec": spec, "made": made}))
    return made


# -- measures, each in a fresh process -------------------------------------------------------------


def proc_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """This process's peak RSS, MiB: ``VmHWM``, not ``ru_maxrss``, which Linux carries over ``execve``
    from the process that forked it (a child of a parent holding 600 MiB reports >= 600 MiB)."""
    return proc_mb("VmHWM")


def start_peak() -> float:
    """Reset this process's peak RSS to its current RSS (``/proc/self/clear_refs``), so that transients
    of the imports do not hide what follows; the baseline, MiB. Where that is refused, the baseline is
    the peak so far."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return peak_mb()
    return proc_mb("VmRSS")


def load_items(names_file: str):
    from pipeline.inputs import InputItem

    names = json.loads(Path(names_file).read_text())
    return [InputItem(video_id=video_id, source_path=path, path=path) for video_id, path in names]


def _resume_new(output: str, items) -> tuple[list[dict], dict]:
    from pipeline.plan import input_rows
    from pipeline.repair import prepare_output
    from pipeline.store import Store

    prepared = prepare_output(Store(output), run_metadata(FRAMES), set_aside=False)
    rows = input_rows(items, [prepared.state], 1)
    details = {"index_files": len(prepared.index.files), "index_entries": prepared.index.entries.num_rows,
               "done_frames": sum(len(row["settled"][0]) for row in rows)}
    return rows, details


def old_pending_rows(inputs, done: dict, failed: dict, sampled: dict) -> list[dict]:
    """``pipeline.run.pending_rows`` before the commit index (as committed at aa0ff77; same logic)."""
    rows = []
    for item in inputs:
        whole_input_failed = item.video_id in failed and failed[item.video_id] is None
        settled = done.get(item.video_id, set()) | (failed.get(item.video_id) or set())
        if whole_input_failed or (item.video_id in sampled and len(settled) >= sampled[item.video_id]):
            continue
        rows.append({"video_id": item.video_id, "source_path": item.source_path, "path": item.path,
                     "filesystem": item.filesystem, "problem": item.problem,
                     "done_frames": sorted(done.get(item.video_id, ())),
                     "failed_frames": sorted(failed.get(item.video_id) or ())})
    return rows


def _resume_old(output: str, items) -> tuple[list[dict], dict]:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from pipeline.inputs import filesystem_and_path
    from pipeline.store import committed_files

    fs, root = filesystem_and_path(output)
    files = committed_files(fs, root, "shards")
    columns = {"video_id": pc.field("video_id"), "frame_index": pc.field("frame_index"),
               "sampled": pc.field("source_info", "sampled_frames")}
    table = pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)
    done: dict[str, set[int]] = {}
    sampled: dict[str, int] = {}
    for video_id, frame_index, count in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        done.setdefault(video_id, set()).add(frame_index)
        sampled[video_id] = count
    del table
    rows = old_pending_rows(items, done, {}, sampled)  # no error files in these outputs
    return rows, {"files": len(files), "done_frames": sum(len(row["done_frames"]) for row in rows)}


def _measure_resume(resume, output: str, names_file: str, warm_output: str, warm_names_file: str) -> dict:
    """``resume`` (`_resume_new` or `_resume_old`) on ``output``, after the same on a small output (so that
    first-use costs are not counted): wall time, peak and held memory, what it planned."""
    resume(warm_output, load_items(warm_names_file))
    items = load_items(names_file)
    baseline = start_peak()
    started = time.perf_counter()
    rows, details = resume(output, items)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "peak_mb": peak_mb() - baseline, "baseline_mb": baseline, "pending": len(rows),
            "held_mb": proc_mb("VmRSS") - baseline, **details}


def measure_resume_new(*paths: str) -> dict:
    """`prepare_output` + `input_rows`, what `pipeline.run._encode` does before it builds the graph."""
    return _measure_resume(_resume_new, *paths)


def measure_resume_old(*paths: str) -> dict:
    """``read_committed`` before the commit index (every shard's keys into Python sets), then the old plan."""
    return _measure_resume(_resume_old, *paths)


def measure_stats(design: str, returns_file: str) -> dict:
    """The driver's ``on_write_complete``: every write task's returned stats (unpickled, as Ray hands
    them over, all at once) summed into one."""
    if design == "new":
        from pipeline.outputs import MethodOutput
        from pipeline.sink import ShardSink, WriteReturn, WriteStats
        from ray.data.datasource.datasink import WriteResult

        sink = ShardSink([MethodOutput("/nonexistent", run_metadata(FRAMES))], 1500, 256 * 2**20, 577)
        make = lambda r: WriteReturn([WriteStats(rows=r["rows"], frames=r["frames"], tokens=r["tokens"],  # noqa: E731
                                                 bytes=r["bytes"], files=r["files"], encoded_videos=set(r["videos"]))],
                                     {})
    else:
        sink = OldSink()
        make = lambda r: OldWriteStats(rows=r["rows"], tokens=r["tokens"], bytes=r["bytes"], files=r["files"],  # noqa: E731
                                       frames=set(map(tuple, r["keys"])), encoded_videos=set(r["videos"]))
        WriteResult = OldWriteResult
    baseline = start_peak()
    started = time.perf_counter()
    returns = []
    with open(returns_file, "rb") as handle:
        while True:
            try:
                returns.append(make(pickle.load(handle)))
            except EOFError:
                break
    received = time.perf_counter()
    rows = sum(r.stats[0].rows if hasattr(r, "stats") else r.rows for r in returns)
    sink.on_write_complete(WriteResult(num_rows=rows, size_bytes=0, write_returns=returns))
    wall = time.perf_counter() - started
    total = sink.stats[0] if isinstance(sink.stats, list) else sink.stats
    return {"wall_s": wall, "receive_s": received - started, "peak_mb": peak_mb() - baseline, "baseline_mb": baseline,
            "writes": len(returns), "rows": total.rows, "videos": len(total.encoded_videos),
            "frames": total.frames if isinstance(total.frames, int) else len(total.frames)}


class OldWriteStats:
    """``pipeline.sink.WriteStats`` before the commit index: a set of every (video_id, frame_index) written."""

    def __init__(self, rows=0, tokens=0, error_rows=0, bytes=0, files=0, frames=None, encoded_videos=None,
                 failed_videos=None) -> None:
        self.rows, self.tokens, self.error_rows, self.bytes, self.files = rows, tokens, error_rows, bytes, files
        self.frames: set[tuple[str, int]] = frames if frames is not None else set()
        self.encoded_videos: set[str] = encoded_videos if encoded_videos is not None else set()
        self.failed_videos: set[str] = failed_videos if failed_videos is not None else set()

    def add(self, other: "OldWriteStats") -> None:
        self.rows += other.rows
        self.tokens += other.tokens
        self.error_rows += other.error_rows
        self.bytes += other.bytes
        self.files += other.files
        self.frames |= other.frames
        self.encoded_videos |= other.encoded_videos
        self.failed_videos |= other.failed_videos


class OldWriteResult:
    def __init__(self, num_rows: int, size_bytes: int, write_returns: list) -> None:
        self.num_rows, self.size_bytes, self.write_returns = num_rows, size_bytes, write_returns


class OldSink:
    def __init__(self) -> None:
        self.stats = OldWriteStats()

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats.add(stats)


def _reader_new(output: str, video: str) -> dict:
    from pipeline.reader import TokenReader

    started = time.perf_counter()
    reader = TokenReader(output)
    opened = time.perf_counter()
    tokens = reader.load(video).num_tokens
    loaded = time.perf_counter()
    reader.storage_groups()  # what `TokenIterableDataset.epoch_order`, which every worker computes, reads
    return {"open_s": opened - started, "load_s": loaded - opened, "epoch_order_s": time.perf_counter() - loaded,
            "videos": len(reader.video_ids()), "files": len(reader.files), "shards_opened": reader.shards_opened,
            "tokens": tokens, "index_mb": reader._index.entries.nbytes / 2**20}


def measure_reader_main(output: str, video: str, warm_output: str, warm_video: str) -> dict:
    """`TokenReader` open, one `load`, then `video_ids` + the epoch order (`TokenIterableDataset`'s start)."""
    _reader_new(warm_output, warm_video)
    baseline = start_peak()
    result = _reader_new(output, video)
    peak = peak_mb() - baseline
    from pipeline.reader import TokenReader

    blob = pickle.dumps(TokenReader(output))  # what a "spawn" DataLoader worker receives: the reader with its index
    started = time.perf_counter()
    pickle.loads(blob)
    return {**result, "peak_mb": peak, "baseline_mb": baseline, "pickled_mb": len(blob) / 2**20,
            "unpickle_s": time.perf_counter() - started}


def _reader_old(output: str, video: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.inputs import filesystem_and_path
    from pipeline.store import committed_files

    started = time.perf_counter()
    fs, root = filesystem_and_path(output)
    paths = committed_files(fs, root, "shards")
    footers = []
    for path in paths:
        with fs.open_input_file(path) as handle:
            footers.append(pq.read_metadata(handle))
    footed = time.perf_counter()
    index: dict[str, list[tuple[int, int]]] = {}
    for number, (path, footer) in enumerate(zip(paths, footers)):
        with fs.open_input_file(path) as handle:
            ids = pq.ParquetFile(handle, metadata=footer).read(columns=["video_id"])["video_id"]
        start = 0
        for group in range(footer.num_row_groups):
            rows = footer.row_group(group).num_rows
            for video_id in pc.unique(ids.slice(start, rows)).to_pylist():
                index.setdefault(video_id, []).append((number, group))
            start += rows
    indexed = time.perf_counter()
    parts = []
    for number, group in index[video]:
        with fs.open_input_file(paths[number]) as handle:
            parts.append(pq.ParquetFile(handle, metadata=footers[number]).read_row_group(group))
    loaded = time.perf_counter()
    return {"footers_s": footed - started, "index_s": indexed - footed, "open_s": indexed - started,
            "load_s": loaded - indexed, "files": len(paths), "videos": len(index),
            "rows": sum(part.num_rows for part in parts)}


def measure_reader_old(output: str, video: str, warm_output: str, warm_video: str) -> dict:
    """The reader before the commit index: every footer at open, then every file's ``video_id``
    column for the video index, then one video's row groups."""
    _reader_old(warm_output, warm_video)
    baseline = start_peak()
    result = _reader_old(output, video)
    return {**result, "peak_mb": peak_mb() - baseline, "baseline_mb": baseline}


_WORKER_START: dict = {}


def _worker_init(worker_id: int) -> None:
    _WORKER_START.update(rss=start_peak(), started=time.perf_counter())


def _worker_figures(reader, loads: list[float]) -> dict:
    from torch.utils.data import get_worker_info

    return {"worker": get_worker_info().id, "loads": len(loads), "first_load_s": loads[0],
            "mean_load_s": sum(loads) / len(loads), "shards_opened": reader.shards_opened,
            "rss_at_start_mb": _WORKER_START["rss"], "growth_mb": peak_mb() - _WORKER_START["rss"]}


class TimedDataset:
    """A `TokenDataset` whose items are each worker's figures so far (the sample is made, then dropped).
    Map-style for the DataLoader (``__len__``, ``__getitem__``); defined here so that "spawn" can pickle it."""

    def __init__(self, out_dir: str, video_ids: list[str]) -> None:
        from pipeline.dataset import TokenDataset

        self.dataset = TokenDataset(out_dir, video_ids)
        self.reader = self.dataset.reader
        self.loads: list[float] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        started = time.perf_counter()
        self.dataset[i]
        self.loads.append(time.perf_counter() - started)
        return _worker_figures(self.reader, self.loads)


def _timed_iterable(out_dir: str, per_worker: int):
    from pipeline.dataset import TokenIterableDataset, make_sample

    class TimedIterable(TokenIterableDataset):
        """Each worker: `worker_videos` (the whole epoch order), then its first ``per_worker`` videos
        (defined here, where torch is imported: fork workers need no pickling)."""

        def __iter__(self):
            started = time.perf_counter()
            mine = self.worker_videos()
            planned = time.perf_counter() - started
            loads = []
            for video_id in mine[:per_worker]:
                started = time.perf_counter()
                make_sample(self.reader.load(video_id), self.budget, self.layout)
                loads.append(time.perf_counter() - started)
            yield {**_worker_figures(self.reader, loads), "worker_videos_s": planned, "assigned": len(mine)}

    return TimedIterable(out_dir)


def measure_loader(output: str, kind: str, video_ids: list[str], per_worker: int, warm_output: str) -> dict:
    """4 DataLoader workers: ``map-fork``/``map-spawn`` (`TokenDataset` over ``video_ids``, dealt
    round-robin) or ``iterable-fork`` (`TokenIterableDataset`, each worker its own run of videos).
    This process first loads a video of the warm-up output (fork workers inherit that; spawn ones
    start bare, so their first load carries first-use costs)."""
    from torch.utils.data import DataLoader

    from pipeline.dataset import TokenDataset

    TokenDataset(warm_output)[0]
    started = time.perf_counter()
    dataset = _timed_iterable(output, per_worker) if kind == "iterable-fork" else TimedDataset(output, video_ids)
    made = time.perf_counter()
    loader = DataLoader(dataset, batch_size=None, num_workers=WORKERS, worker_init_fn=_worker_init,
                        multiprocessing_context=kind.split("-")[1])
    last: dict[int, dict] = {}
    for figures in loader:
        last[figures["worker"]] = figures
    return {"dataset_s": made - started, "loader_s": time.perf_counter() - made, "main_shards_opened":
            dataset.reader.shards_opened, "workers": [last[w] for w in sorted(last)]}


MEASURES = {"resume-new": measure_resume_new, "resume-old": measure_resume_old, "stats": measure_stats,
            "reader-main": measure_reader_main, "reader-old": measure_reader_old, "loader": measure_loader}


def child(name: str, *args) -> dict:
    """``MEASURES[name](*args)`` in a fresh Python process; its result."""
    result = subprocess.run([sys.executable, __file__, "--measure", name, json.dumps(args)], capture_output=True,
                            text=True)
    if result.returncode:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"measure {name} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def mib(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 10 else f"{value:,.0f}"


def ratio(old: float, new: float) -> str:
    return f"{old / new:.0f}×" if new > 0 and old / new >= 10 else (f"{old / new:.1f}×" if new > 0 else "n/a")


def make_warmup(work: Path) -> tuple[str, str, str]:
    """A 20-video output each measure first runs its code on (imports, thread pools, allocator arenas,
    caches: first-use costs that do not grow with the output): (output, inputs file, one video)."""
    names = input_names(20, "warmup")
    output = work / "warmup-out"
    make_output(output, {"videos": 20}, lambda: write_output(output, names, committed_keys(20, FRAMES), 150,
                                                             run_metadata(FRAMES)))
    names_file = work / "warmup-inputs.json"
    names_file.write_text(json.dumps(names))
    return str(output), str(names_file), names[0][0]


def bench_resume(work: Path, size: dict, mode: str, warm: tuple[str, str, str]) -> dict:
    videos, output = size["videos"], work / "resume-out"
    names = input_names(videos, "resume")
    keys = committed_keys(videos, FRAMES)
    spec = {"videos": videos, "frames": FRAMES, "frames_per_shard": size["frames_per_shard"], "hidden": HIDDEN,
            "tokens_per_row": TOKENS_PER_ROW, "partial_every": PARTIAL_EVERY}
    made = make_output(output, spec, lambda: write_output(output, names, keys, size["frames_per_shard"],
                                                          run_metadata(FRAMES)))
    names_file = work / "resume-inputs.json"
    names_file.write_text(json.dumps(names))
    partial = videos // PARTIAL_EVERY
    say(f"[{mode}] resume output: {made['rows']:,} rows ({videos:,} videos × {FRAMES} frames, one view, "
        f"{partial:,} with {FRAMES // 2} of {FRAMES} frames committed), {made['shards']:,} shard files, "
        f"{made['shard_mb']:.0f} MiB; " + ("reused from --workdir" if made.get("reused") else
                                           f"committed in {made['commit_s']:.0f} s, {made['parts']:,} index parts "
                                           f"merged in {made['merge_s']:.1f} s"))
    new = child("resume-new", str(output), str(names_file), warm[0], warm[1])
    say(f"[{mode}] resume, index (prepare_output + input_rows, {videos:,} inputs): {new['wall_s']:.2f} s, "
        f"driver peak +{mib(new['peak_mb'])} MiB over {new['baseline_mb']:.0f} MiB after imports and warm-up "
        f"(+{mib(new['held_mb'])} MiB held after); {new['index_files']} index file(s), {new['index_entries']:,} "
        f"entries; {new['pending']:,} inputs pending with {new['done_frames']:,} done frames")
    old = child("resume-old", str(output), str(names_file), warm[0], warm[1])
    say(f"[{mode}] resume, previous design (keys of {old['files']:,} shards into sets + old pending_rows): "
        f"{old['wall_s']:.2f} s, driver peak +{mib(old['peak_mb'])} MiB over {old['baseline_mb']:.0f} MiB "
        f"(+{mib(old['held_mb'])} MiB held after); {old['pending']:,} inputs pending with {old['done_frames']:,} done "
        "frames")
    if (new["pending"], new["done_frames"]) != (old["pending"], old["done_frames"]):
        say(f"[{mode}] WARNING: the two designs plan differently: {new['pending']} vs {old['pending']} pending")
    say(f"[{mode}] resume ratio (previous / index): peak memory {ratio(old['peak_mb'], new['peak_mb'])}, "
        f"time {ratio(old['wall_s'], new['wall_s'])}")
    reader = child("reader-main", str(output), names[videos // 2][0], warm[0], warm[2])
    say(f"[{mode}] reader on the resume output ({reader['videos']:,} videos, {reader['files']:,} files): "
        f"TokenReader open {reader['open_s']:.2f} s, one load {reader['load_s'] * 1000:.0f} ms, peak "
        f"+{mib(reader['peak_mb'])} MiB (index table {reader['index_mb']:.1f} MiB), shards opened "
        f"{reader['shards_opened']}; epoch order (TokenIterableDataset) {reader['epoch_order_s']:.2f} s; pickled "
        f"{reader['pickled_mb']:.1f} MiB, unpickled in {reader['unpickle_s'] * 1000:.0f} ms")
    return {"made": made, "new": new, "old": old, "reader": reader}


def write_returns(path: Path, keys: list[tuple[int, int]], names: list[tuple[str, str]], writes: int,
                  design: str) -> None:
    """What each of ``writes`` write tasks returns (rows in listing order, cut evenly), pickled one by one."""
    per_write = -(-len(keys) // writes)
    with open(path, "wb") as handle:
        for start in range(0, len(keys), per_write):
            chunk = keys[start:start + per_write]
            record = {"rows": len(chunk), "frames": len(chunk), "tokens": len(chunk) * TOKENS_PER_ROW,
                      "bytes": len(chunk) * 400, "files": 1, "videos": sorted({names[v][0] for v, _ in chunk})}
            if design == "old":
                record["keys"] = [(names[v][0], f) for v, f in chunk]
            pickle.dump(record, handle, protocol=pickle.HIGHEST_PROTOCOL)


def bench_stats(work: Path, size: dict, mode: str) -> dict:
    videos, writes = size["videos"], size["writes"]
    names = input_names(videos, "resume")
    keys = committed_keys(videos, FRAMES)
    results = {}
    for design in ("new", "old"):
        path = work / f"stats-{design}.pickle"
        write_returns(path, keys, names, writes, design)
        results[design] = child("stats", design, str(path))
        path.unlink()
    new, old = results["new"], results["old"]
    say(f"[{mode}] write stats, WriteStats (counts + video ids): {new['writes']:,} writes, {new['rows']:,} rows, "
        f"{new['videos']:,} videos: driver peak +{mib(new['peak_mb'])} MiB, {new['wall_s']:.2f} s")
    say(f"[{mode}] write stats, previous WriteStats (+ set of (video_id, frame_index)): {old['writes']:,} writes, "
        f"{old['frames']:,} frame keys: driver peak +{mib(old['peak_mb'])} MiB, {old['wall_s']:.2f} s; ratio "
        f"{ratio(old['peak_mb'], new['peak_mb'])}")
    return results


def bench_reader(work: Path, size: dict, mode: str, warm: tuple[str, str, str]) -> dict:
    files, output = size["reader_files"], work / "reader-out"
    names = input_names(files, "reader")
    keys = [(v, f) for v in range(files) for f in range(READER_FRAMES)]
    spec = {"files": files, "frames": READER_FRAMES, "hidden": HIDDEN, "tokens_per_row": TOKENS_PER_ROW}
    made = make_output(output, spec, lambda: write_output(output, names, keys, READER_FRAMES,
                                                          run_metadata(READER_FRAMES)))
    say(f"[{mode}] reader output: {made['shards']:,} shard files (one video of {READER_FRAMES} frames each), "
        f"{made['shard_mb']:.0f} MiB; " + ("reused from --workdir" if made.get("reused") else
                                           f"committed in {made['commit_s']:.0f} s, {made['parts']:,} index parts "
                                           f"merged in {made['merge_s']:.1f} s"))
    video = names[files // 2][0]
    main = child("reader-main", str(output), video, warm[0], warm[2])
    say(f"[{mode}] reader, index, main process: TokenReader open {main['open_s'] * 1000:.0f} ms, one load "
        f"{main['load_s'] * 1000:.0f} ms, peak +{mib(main['peak_mb'])} MiB, shard files opened "
        f"{main['shards_opened']} of {main['files']:,}; the reader pickles (to spawn workers) to "
        f"{main['pickled_mb']:.1f} MiB, unpickled in {main['unpickle_s'] * 1000:.0f} ms")
    old = child("reader-old", str(output), video, warm[0], warm[2])
    say(f"[{mode}] reader, previous design (every footer, then every file's video_id column): open "
        f"{old['open_s']:.2f} s ({old['footers_s']:.2f} s footers + {old['index_s']:.2f} s video ids), one load "
        f"{old['load_s'] * 1000:.0f} ms, peak +{mib(old['peak_mb'])} MiB, {old['files']:,} files opened; open "
        f"ratio {ratio(old['open_s'], main['open_s'])}")
    step = max(1, files // (WORKERS * size["per_worker"]))
    subset = [names[i][0] for i in range(0, files, step)][:WORKERS * size["per_worker"]]
    loaders = {}
    for kind in ("map-fork", "map-spawn", "iterable-fork"):
        loaders[kind] = result = child("loader", str(output), kind, subset, size["per_worker"], warm[0])
        workers = result["workers"]
        what = (f"TokenDataset over {len(subset)} videos" if kind.startswith("map") else
                f"TokenIterableDataset, first {size['per_worker']} of each worker's videos")
        say(f"[{mode}] reader, DataLoader {WORKERS} workers ({kind.split('-')[1]}), {what}: dataset made in "
            f"{result['dataset_s']:.2f} s, all items in {result['loader_s']:.1f} s; per worker: shard files opened "
            f"{[w['shards_opened'] for w in workers]} of {files:,}, first load (footer included) "
            f"{[round(w['first_load_s'] * 1000) for w in workers]} ms, mean load "
            f"{[round(w['mean_load_s'] * 1000) for w in workers]} ms, memory growth "
            f"{[round(w['growth_mb']) for w in workers]} MiB over RSS at start "
            f"{[round(w['rss_at_start_mb']) for w in workers]} MiB"
            + (f", worker_videos {[round(w['worker_videos_s'], 2) for w in workers]} s"
               if kind.startswith("iterable") else "") + f"; main process opened {result['main_shards_opened']}")
    return {"made": made, "main": main, "old": old, "loaders": loaders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200,000 rows and 2,000 reader files (about 5 minutes)")
    parser.add_argument("--workdir", help="where the outputs go, kept and reused (default: a temporary folder, removed)")
    parser.add_argument("--videos", type=int, help="videos of the resume output (default 100,000; --quick 10,000)")
    parser.add_argument("--reader-files", type=int, help="shard files of the reader output (default 10,000; --quick 2,000)")
    parser.add_argument("--only", choices=("resume", "stats", "reader"), action="append", help="run only these parts")
    parser.add_argument("--measure", nargs=2, metavar=("NAME", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure[0]](*json.loads(args.measure[1]))))
        return

    mode = "quick" if args.quick else "full"
    size = {**SIZES[mode], **{key: value for key, value in (("videos", args.videos), ("reader_files", args.reader_files))
                              if value is not None}}
    parts = args.only or ["resume", "stats", "reader"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        say(f"[{mode}] {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, outputs in {work}")
        results = {}
        warm = make_warmup(work)
        if "resume" in parts:
            results["resume"] = bench_resume(work, size, mode, warm)
        if "stats" in parts:
            results["stats"] = bench_stats(work, size, mode)
        if "reader" in parts:
            results["reader"] = bench_reader(work, size, mode, warm)
    summary = []
    if "resume" in results:
        r = results["resume"]
        summary.append(f"resume {r['made']['rows']:,} rows: {r['new']['wall_s']:.1f} s / +{mib(r['new']['peak_mb'])} "
                       f"MiB vs {r['old']['wall_s']:.1f} s / +{mib(r['old']['peak_mb'])} MiB before")
    if "stats" in results:
        s = results["stats"]
        summary.append(f"write stats: +{mib(s['new']['peak_mb'])} MiB vs +{mib(s['old']['peak_mb'])} MiB before")
    if "reader" in results:
        r = results["reader"]
        opened = sorted({w["shards_opened"] for w in r["loaders"]["map-fork"]["workers"]})
        summary.append(f"reader {r['made']['shards']:,} files: open {r['main']['open_s']:.2f} s vs "
                       f"{r['old']['open_s']:.1f} s before, {opened} files opened per worker")
    say(f"[{mode}] summary: " + "; ".join(summary) + f" (benchmark {time.perf_counter() - started:.0f} s, load "
        f"average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
