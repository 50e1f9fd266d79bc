"""The Ray Data stages: one callable class per stage, on rows/batches.

DecodeInputs (CPU actor, one input row → segment rows): fetches a remote input once, then runs
             `operators.frames.frame_rows` (probe, sample, decode at the model's size, crop/pad or
             AnyRes-tile) in a child process with a stall limit; each segment row carries up to
             ``segment_frames`` consecutive decoded frames of the input (one with per-frame methods only;
             `EncodeConfig.segment_size`), ``pixels [V, S, S, 3]`` uint8 (their views, each frame's
             global view first) and the input's ``source_info``.
EncodeTokens (actor, batch of segment rows → Arrow table): the vision tower once, then every method of
             the run (`operators.methods`) on one device: one row per frame, or per temporal window, per method.

What the input is to blame for (a `MediaError`, a decoder that hangs, crashes or is killed) becomes a
row with ``error_type``/``error_message`` set that flows on to the sink's error table. Anything else (a
remote read that keeps failing after `pipeline.inputs.fetch`'s retries, a full disk, out of memory in
this worker, a bug) is transient or ours: it raises and the run fails loudly (Ray restarts a dead actor
and retries its task a bounded number of times); it is never recorded as the input's fault, so a later
run tries the input again.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from operators.encode import VisionEncoder
from operators.frames import FrameRequest, error_row, frame_rows, frame_span
from operators.methods import ReducedRows, reduce_views
from operators.preprocess import Preprocessing
from pipeline.child import ChildFailed, ChildProcess
from pipeline.config import EncodeConfig
from pipeline.inputs import local_file
from pipeline.schema import encoded_schema, failure_table, ragged, shard_schema, source_info_array

NO_ERROR = {"error_type": "", "error_message": "", "failed_frames": []}
# Per-frame lists of a segment row (one entry per frame; ``pixels`` holds all their views).
FRAME_FIELDS = ("frame_index", "timestamp_s", "grid_rows", "grid_cols", "views")


def frame_request(config: EncodeConfig, preprocessing: Preprocessing, path: str, skip_frames=(),
                  frames=None) -> FrameRequest:
    """What `operators.frames.frame_rows` should make of one input under ``config`` (resolved by
    `EncodeConfig.for_tower`) for a tower that takes ``preprocessing``."""
    return FrameRequest(
        path=path,
        media=config.media,
        sampling=config.sampling(),
        frames=tuple(frames) if frames is not None else None,
        skip_frames=frozenset(int(i) for i in skip_frames),
        preprocessing=preprocessing,
        anyres=config.anyres,
        pinpoints=config.pinpoint_list() if config.anyres else (),
        max_image_pixels=config.max_image_pixels,
        max_frame_pixels=config.max_frame_pixels,
    )


class DecodeInputs:
    """Ray actor: input rows (``video_id``, ``source_path``, ``path``, ``filesystem``, ``problem``,
    ``done_frames``, ``failed_frames``, ``spec_done``) → segment rows.

    ``preprocessing`` is the tower's (`EncodeConfig.preprocessing`). ``filesystems``
    (`pipeline.inputs.Listing.filesystems`) open each row's ``path``: the filesystem
    that listed an input opens it, with its options (endpoint, region). One child process per actor
    does the decoding; it is killed when it sends nothing for ``config.decode_timeout_s`` and
    restarted for the next input.

    A segment row holds up to ``config.segment_size()`` frames that are neighbours in the input's sampling
    (each the sampled frame after the one before): a frame skipped (committed or failed earlier) or failing
    now ends a segment, so no segment spans a frame it does not hold.
    """

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing,
                 filesystems: dict[str, pafs.FileSystem]) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.filesystems = filesystems
        self.segment_size = config.segment_size()
        self.child = ChildProcess(config.decode_timeout_s, preload=("operators.frames",))

    def __call__(self, row: dict) -> Iterator[dict]:
        if row["problem"]:  # a name no decoder can open (the listing found out)
            yield self._failed(row, error_row("InvalidPath", row["problem"]))
            return
        skip = [*row["done_frames"], *row["failed_frames"]]
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(local_file(self.filesystems[row["filesystem"]], row["path"]))
            except FileNotFoundError as error:  # listed, then gone: the input's fault, not the run's
                yield self._failed(row, error_row("FileNotFoundError", f"no such file: {error}"))
                return
            except IsADirectoryError as error:
                yield self._failed(row, error_row("IsADirectoryError", str(error)))
                return
            request = frame_request(self.config, self.preprocessing, path, skip)
            todo: list[int] | None = None  # frames the child will decode, once it has probed the input
            following: dict[int, int] = {}  # each sampled frame's successor in the sampling
            delivered: set[int] = set()
            segment: list[dict] = []
            source_info = ""
            try:
                for item in self.child.run(frame_rows, request):
                    if item["kind"] == "source":
                        source_info = json.dumps(item["source_info"])
                        todo = item["todo"]
                        following = dict(zip(item["sampled"], item["sampled"][1:]))
                    elif item["kind"] == "frame":
                        delivered.add(item["frame_index"])
                        if segment and following.get(segment[-1]["frame_index"]) != item["frame_index"]:
                            yield self._segment(row, segment, source_info)  # a gap in the sampling ends it
                            segment = []
                        segment.append(item)
                        if len(segment) == self.segment_size:
                            yield self._segment(row, segment, source_info)
                            segment = []
                    else:
                        if segment:
                            yield self._segment(row, segment, source_info)
                            segment = []
                        delivered.update(item["failed_frames"])
                        yield self._failed(row, item)
            except ChildFailed as failure:
                if segment:  # delivered before the decoder hung or died: encoded
                    yield self._segment(row, segment, source_info)
                    segment = []
                lost = self._lost(failure, todo, delivered)
                if lost is not None:
                    yield self._failed(row, lost)
            if segment:
                yield self._segment(row, segment, source_info)

    @staticmethod
    def _lost(failure: ChildFailed, todo: list[int] | None, delivered: set[int]) -> dict | None:
        """The error row for what a hung or dead decoder did not deliver (None: it had delivered everything)."""
        error_type = "DecoderStalled" if failure.stalled else "DecoderDied"
        if todo is None:
            return error_row(error_type, f"{failure.reason} while opening the input")
        lost = [i for i in todo if i not in delivered]
        if not lost:
            return None
        return error_row(error_type, f"{frame_span(lost)} not decoded: {failure.reason}", lost)

    def _segment(self, row: dict, frames: list[dict], source_info: str) -> dict:
        return {
            "video_id": row["video_id"],
            "source_path": row["source_path"],
            "frame_index": [int(f["frame_index"]) for f in frames],
            "timestamp_s": [float(f["timestamp_s"]) for f in frames],
            "grid_rows": [int(f["grid_rows"]) for f in frames],
            "grid_cols": [int(f["grid_cols"]) for f in frames],
            "views": [len(f["pixels"]) for f in frames],
            "pixels": np.concatenate([f["pixels"] for f in frames]),  # [V, S, S, 3] uint8, global view first
            "source_info": source_info,
            "spec_done": row["spec_done"],
            **NO_ERROR,
        }

    def _failed(self, row: dict, error: dict) -> dict:
        """A segment row standing for a failure: no frames, no pixels, the error columns set."""
        return {
            "video_id": row["video_id"],
            "source_path": row["source_path"],
            **{name: [] for name in FRAME_FIELDS},
            "pixels": np.zeros((0, self.preprocessing.image_size, self.preprocessing.image_size, 3), np.uint8),
            "source_info": "",
            "spec_done": row["spec_done"],
            "error_type": error["error_type"],
            "error_message": error["error_message"],
            "failed_frames": list(error["failed_frames"]),
        }

    def __del__(self) -> None:
        self.child.close()


class EncodeTokens:
    """Ray actor: loads the tower once, then per batch the tower once and every method of the run, on the
    same device.

    ``config`` is resolved by `EncodeConfig.for_tower`; ``preprocessing`` normalises the views (its mean/std).
    `reduce` is the device work; the rest (splitting a batch, building its Arrow table) is host work that a
    stand-in for another device (``benchmarks/bench_standin.py``) keeps by overriding `reduce` only."""

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing, threads: int | None = None) -> None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads:  # what the run's plan gives a CPU encoder (`pipeline.resources`); None on a GPU
            torch.set_num_threads(threads)
        self.config = config
        self.specs = config.methods()
        started = time.monotonic()
        self.encoder = VisionEncoder(
            config.model,
            layer=config.layer,
            device=device,
            dtype=getattr(torch, config.dtype) if config.dtype else None,
            importance=config.importance,
            revision=config.model_revision,
        )
        self.preprocessing = preprocessing
        self.schema = encoded_schema(shard_schema(self.encoder.hidden_size))
        # the run's log keeps what workers print (`pipeline.runlog`): one line per encoder actor
        print(f"encoder ready: {self.encoder.family.name} tower, {self.encoder.layer} blocks run, importance "
              f"{self.encoder.importance}, {self.encoder.device} {self.encoder.dtype}, "
              f"{torch.get_num_threads()} threads, loaded in {time.monotonic() - started:.1f} s", file=sys.stderr,
              flush=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Segment rows → per method, one row per frame or temporal window (views' tokens in lists), plus one
        row per failure (error columns set); see `pipeline.schema.encoded_schema`."""
        failed = np.array([bool(t) for t in batch["error_type"]], dtype=bool)
        tables = [self._encode({key: values[~failed] for key, values in batch.items()})] if (~failed).any() else []
        if failed.any():  # an error row for each method that still needed the input's frames
            errors = failure_table({key: values[failed] for key, values in batch.items()}, self.schema)
            done = [self._spec_done(text) for text in batch["spec_done"][failed]]
            wanted = [(r, spec) for r, per_spec in enumerate(done) for spec, frames in enumerate(per_spec)
                      if frames is not None]
            errors = errors.take([r for r, _ in wanted])
            tables.append(errors.set_column(errors.schema.get_field_index("spec"), "spec",
                                            pa.array([spec for _, spec in wanted], pa.int16())))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _spec_done(self, text: str) -> list[list[int] | None]:
        """Per method, the input's frames only it has (null: it has the whole input), from a row's ``spec_done``
        (`pipeline.run.pending_rows`; empty: no method has frames the others lack)."""
        return json.loads(text) if text else [[]] * len(self.specs)

    @torch.inference_mode()
    def reduce(self, images: torch.Tensor, view_frames: list[int], todo: list[list[int]]) -> list[ReducedRows]:
        """``images [V, S, S, 3]`` uint8 views (host memory) → each method's rows: one tower forward, then the
        methods, on the encoder's device. ``view_frames[v]`` is view v's frame in the batch; ``todo[m]`` the
        segments (lists of consecutive batch frames of one video) method m still needs."""
        if self.encoder.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.encoder.device, non_blocking=True)
        out = self.encoder(self.preprocessing.normalize(images))
        results = []
        for spec, segments in zip(self.specs, todo):
            if not segments:  # an earlier run committed all of this batch for this method
                results.append(ReducedRows([], [], [], [], [], [], []))
                continue
            wanted = {frame for segment in segments for frame in segment}
            views = [v for v, frame in enumerate(view_frames) if frame in wanted]
            if len(views) == len(view_frames):
                kept = slice(None)
            else:  # frames an earlier run committed for this method only: not reduced again
                kept = torch.tensor(views, dtype=torch.int64, device=out.features.device)
            results.append(reduce_views(spec, out.features[kept], out.keys[kept], out.importance[kept],
                                        [view_frames[v] for v in views], segments, self.config.k_neighbors))
        return results

    def _encode(self, rows: dict[str, np.ndarray]) -> pa.Table:
        lengths = [len(indices) for indices in rows["frame_index"]]  # frames of each segment row
        frames = {name: np.concatenate([np.asarray(v) for v in rows[name]]) for name in FRAME_FIELDS}  # [F] each
        frames["row"] = np.repeat(np.arange(len(lengths)), lengths)  # [F]: the segment row of each frame
        view_frames = np.repeat(np.arange(len(frames["row"])), frames["views"]).tolist()  # [V]
        starts = np.cumsum([0, *lengths])
        # per method, the batch's frames it still needs, in runs of neighbouring frames of one input
        done = [self._spec_done(text) for text in rows["spec_done"]]
        todo = []
        for spec in range(len(self.specs)):
            segments = []
            for r, indices in enumerate(rows["frame_index"]):
                if done[r][spec] is None:
                    continue
                skip = set(done[r][spec])
                # the runs of the row's frames this method lacks: a frame it has ends a run
                segment: list[int] = []
                for i, f in enumerate(indices):
                    if int(f) in skip:
                        segments += [segment] if segment else []
                        segment = []
                    else:
                        segment.append(int(starts[r]) + i)
                segments += [segment] if segment else []
            todo.append(segments)
        reduced = self.reduce(torch.from_numpy(np.concatenate(list(rows["pixels"]))), view_frames, todo)
        tables = [self._rows(spec, result, rows, frames) for spec, result in enumerate(reduced) if result.row_frames]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _rows(self, spec: int, reduced: ReducedRows, rows: dict[str, np.ndarray],
              frames: dict[str, np.ndarray]) -> pa.Table:
        """One method's rows as an Arrow table in the encoded schema (one device-to-host copy per column).
        ``frames`` holds the batch's per-frame values (`FRAME_FIELDS`, and ``row``: its segment row)."""
        counts = np.array(reduced.row_views)  # views per output row
        num_tokens = np.array(reduced.num_tokens)  # [sum views]
        tokens = torch.cat(reduced.tokens).to(torch.float16).cpu().numpy()  # [sum n, C]
        positions = torch.cat(reduced.positions).cpu().numpy().astype(np.int16)  # [sum n]
        scores = torch.cat(reduced.scores).float().cpu().numpy()  # [sum n]
        numbers = frames["frame_index"].astype(np.int32)
        first = numbers[torch.cat(reduced.first_frames).cpu().numpy()]  # [sum n] source frame numbers
        last = numbers[torch.cat(reduced.last_frames).cpu().numpy()]
        covered = np.concatenate(reduced.row_frames)  # batch frames of each output row, row after row
        sizes = np.array([len(f) for f in reduced.row_frames])
        heads = np.array([f[0] for f in reduced.row_frames])  # each output row's first frame
        source = frames["row"][heads]  # the segment row it came from

        def per_row(view_values: pa.Array) -> pa.ListArray:
            """Group the per-view values into one list per output row (``counts[i]`` views each)."""
            return ragged(view_values, counts, view_values.type)

        columns = {
            "video_id": pa.array(rows["video_id"][source], pa.string()),
            "source_path": pa.array(rows["source_path"][source], pa.string()),
            "frame_index": pa.array(numbers[heads], pa.int32()),
            "timestamp_s": pa.array(frames["timestamp_s"][heads], pa.float64()),
            "frame_indices": ragged(numbers[covered], sizes, pa.int32()),
            "timestamps_s": ragged(frames["timestamp_s"][covered].astype(np.float64), sizes, pa.float64()),
            "tile_index": per_row(pa.array(np.concatenate([np.arange(-1, n - 1) for n in counts]), pa.int16())),
            "grid_rows": pa.array(frames["grid_rows"][heads], pa.int16()),
            "grid_cols": pa.array(frames["grid_cols"][heads], pa.int16()),
            "num_tokens": per_row(pa.array(num_tokens, pa.int32())),
            "tokens": per_row(ragged(tokens, num_tokens, self.schema.field("tokens").type.value_type.value_type)),
            "positions": per_row(ragged(positions, num_tokens, pa.int16())),
            "scores": per_row(ragged(scores, num_tokens, pa.float32())),
            "first_frames": per_row(ragged(first, num_tokens, pa.int32())),
            "last_frames": per_row(ragged(last, num_tokens, pa.int32())),
            "source_info": source_info_array([json.loads(info) for info in rows["source_info"][source]]),
            "spec": pa.array(np.full(len(heads), spec), pa.int16()),
        }
        errors = {f.name: pa.nulls(len(heads), f.type) for f in self.schema if f.name not in columns}  # unset
        return pa.Table.from_pydict({**columns, **errors}, schema=self.schema)
