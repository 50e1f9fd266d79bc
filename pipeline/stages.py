"""The Ray Data stages: one callable class per stage, on rows/batches.

DecodeInputs (CPU actor, one input row → frame rows): fetches a remote input once, then runs
             `operators.frames.frame_rows` (probe, sample, decode at the model's size, crop/pad or
             AnyRes-tile) in a child process with a stall limit; each frame row carries
             ``pixels [T, S, S, 3]`` uint8 (T views: global first) and the input's ``source_info``.
EncodeTokens (actor, batch of frame rows → Arrow table): the vision tower once plus PruMerge on one device.

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
from operators.preprocess import Preprocessing
from operators.prumerge import ReducedFrames, prumerge
from pipeline.child import ChildFailed, ChildProcess
from pipeline.config import EncodeConfig
from pipeline.inputs import local_file
from pipeline.schema import encoded_schema, failure_table, ragged, shard_schema, source_info_array

NO_ERROR = {"error_type": "", "error_message": "", "failed_frames": []}


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
    ``done_frames``, ``failed_frames``) → frame rows.

    ``preprocessing`` is the tower's (`EncodeConfig.preprocessing`). ``filesystems``
    (`pipeline.inputs.Listing.filesystems`) open each row's ``path``: the filesystem
    that listed an input opens it, with its options (endpoint, region). One child process per actor
    does the decoding; it is killed when it sends nothing for ``config.decode_timeout_s`` and
    restarted for the next input.
    """

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing,
                 filesystems: dict[str, pafs.FileSystem]) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.filesystems = filesystems
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
            delivered: set[int] = set()
            source_info = ""
            try:
                for item in self.child.run(frame_rows, request):
                    if item["kind"] == "source":
                        source_info = json.dumps(item["source_info"])
                        todo = item["todo"]
                    elif item["kind"] == "frame":
                        delivered.add(item["frame_index"])
                        yield self._row(row, item, source_info)
                    else:
                        delivered.update(item["failed_frames"])
                        yield self._failed(row, item)
            except ChildFailed as failure:
                lost = self._lost(failure, todo, delivered)
                if lost is not None:
                    yield self._failed(row, lost)

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

    def _row(self, row: dict, item: dict, source_info: str) -> dict:
        return {
            "video_id": row["video_id"],
            "source_path": row["source_path"],
            "frame_index": int(item["frame_index"]),
            "timestamp_s": float(item["timestamp_s"]),
            "grid_rows": item["grid_rows"],
            "grid_cols": item["grid_cols"],
            "pixels": item["pixels"],  # [T, S, S, 3] uint8, global view first
            "source_info": source_info,
            **NO_ERROR,
        }

    def _failed(self, row: dict, error: dict) -> dict:
        """A frame row standing for a failure: no pixels, the error columns set."""
        return {
            "video_id": row["video_id"],
            "source_path": row["source_path"],
            "frame_index": -1,
            "timestamp_s": 0.0,
            "grid_rows": 0,
            "grid_cols": 0,
            "pixels": np.zeros((0, self.preprocessing.image_size, self.preprocessing.image_size, 3), np.uint8),
            "source_info": "",
            "error_type": error["error_type"],
            "error_message": error["error_message"],
            "failed_frames": list(error["failed_frames"]),
        }

    def __del__(self) -> None:
        self.child.close()


class EncodeTokens:
    """Ray actor: loads the tower once, then the tower once + PruMerge per batch, on the same device.

    ``config`` is resolved by `EncodeConfig.for_tower`; ``preprocessing`` normalises the views (its mean/std).
    `reduce` is the device work; the rest (splitting a batch, building its Arrow table) is host work that a
    stand-in for another device (``benchmarks/bench_standin.py``) keeps by overriding `reduce` only."""

    def __init__(self, config: EncodeConfig, preprocessing: Preprocessing, threads: int | None = None) -> None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads:  # what the run's plan gives a CPU encoder (`pipeline.resources`); None on a GPU
            torch.set_num_threads(threads)
        self.config = config
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
        """Frame rows → one row per frame (its views' tokens in lists) plus one row per failure (error
        columns set); see `pipeline.schema.encoded_schema`."""
        failed = np.array([bool(t) for t in batch["error_type"]], dtype=bool)
        tables = [self._encode({key: values[~failed] for key, values in batch.items()})] if (~failed).any() else []
        if failed.any():
            tables.append(failure_table({key: values[failed] for key, values in batch.items()}, self.schema))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    @torch.inference_mode()
    def reduce(self, images: torch.Tensor) -> ReducedFrames:
        """``images [V, S, S, 3]`` uint8 views (host memory) → their reduced tokens: one tower forward, then
        PruMerge, on the encoder's device."""
        if self.encoder.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.encoder.device, non_blocking=True)
        out = self.encoder(self.preprocessing.normalize(images))
        return prumerge(
            out.features, out.keys, out.importance,
            mode=self.config.method, budget=self.config.budget, k_neighbors=self.config.k_neighbors,
        )

    def _encode(self, frames: dict[str, np.ndarray]) -> pa.Table:
        views = [np.asarray(pixels) for pixels in frames["pixels"]]  # each [T_i, S, S, 3] uint8
        counts = np.array([len(v) for v in views])
        reduced = self.reduce(torch.from_numpy(np.concatenate(views)))  # [sum T] views
        # One device-to-host copy per column for the whole batch.
        num_tokens = np.array(reduced.num_tokens)  # [sum T]
        tokens = torch.cat(reduced.tokens).to(torch.float16).cpu().numpy()  # [sum n_i, C]
        positions = torch.cat(reduced.positions).cpu().numpy().astype(np.int16)  # [sum n_i]
        scores = torch.cat(reduced.scores).cpu().numpy()  # [sum n_i]

        def per_frame(view_values: pa.Array) -> pa.ListArray:
            """Group the per-view values into one list per frame (``counts[i]`` views each)."""
            return ragged(view_values, counts, view_values.type)

        columns = {
            "video_id": pa.array(frames["video_id"], pa.string()),
            "source_path": pa.array(frames["source_path"], pa.string()),
            "frame_index": pa.array(frames["frame_index"], pa.int32()),
            "timestamp_s": pa.array(frames["timestamp_s"], pa.float64()),
            "tile_index": per_frame(pa.array(np.concatenate([np.arange(-1, n - 1) for n in counts]), pa.int16())),
            "grid_rows": pa.array(frames["grid_rows"], pa.int16()),
            "grid_cols": pa.array(frames["grid_cols"], pa.int16()),
            "num_tokens": per_frame(pa.array(num_tokens, pa.int32())),
            "tokens": per_frame(ragged(tokens, num_tokens, self.schema.field("tokens").type.value_type.value_type)),
            "positions": per_frame(ragged(positions, num_tokens, pa.int16())),
            "scores": per_frame(ragged(scores, num_tokens, pa.float32())),
            "source_info": source_info_array([json.loads(info) for info in frames["source_info"]]),
        }
        errors = {f.name: pa.nulls(len(counts), f.type) for f in self.schema if f.name not in columns}  # unset
        return pa.Table.from_pydict({**columns, **errors}, schema=self.schema)
