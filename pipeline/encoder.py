"""The encoder stage (a Ray actor on a GPU or CPU): a batch of the decoder's rows → encoded rows
(`pipeline.schema.encoded_schema`) for the sink.

Per batch the vision tower runs once over every view of every segment row; then every method of the run
(`operators.methods`) reduces, on the same device, the frames that method lacks (each segment row's
``reduce`` list): a per-frame method one unit per frame (its views), a temporal method one unit per segment
(its windows, each over a run of neighbouring sampled frames of the segment). Error and plan rows pass
through as they are.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow as pa
import torch

from operators.encode import VisionEncoder
from operators.methods import ReducedRows, reduce_views
from operators.preprocess import Preprocessing
from pipeline.config import EncodeConfig
from pipeline.decoder import FRAME_FIELDS
from pipeline.schema import encoded_rows, encoded_schema, ragged, shard_schema, source_info_array


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
        self.shard = shard_schema(self.encoder.hidden_size)
        self.schema = encoded_schema(self.shard)
        # the run's log keeps what workers print (`pipeline.runlog`): one line per encoder actor
        print(f"encoder ready: {self.encoder.family.name} tower, {self.encoder.layer} blocks run, importance "
              f"{self.encoder.importance}, {self.encoder.device} {self.encoder.dtype}, "
              f"{torch.get_num_threads()} threads, loaded in {time.monotonic() - started:.1f} s", file=sys.stderr,
              flush=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decoder rows → encoded rows: the units of every method, then the error and plan rows passed on."""
        segments = batch["kind"] == "segment"
        tables = [self._encode({key: values[segments] for key, values in batch.items()})] if segments.any() else []
        for kind in ("error", "plan"):
            rows = batch["kind"] == kind
            if rows.any():
                tables.append(self._passed(kind, {key: values[rows] for key, values in batch.items()}))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _passed(self, kind: str, rows: dict[str, np.ndarray]) -> pa.Table:
        """Error or plan rows in the encoded schema."""
        columns = {"video_id": pa.array(rows["video_id"], pa.string()),
                   "source_path": pa.array(rows["source_path"], pa.string())}
        if kind == "plan":
            columns["sampled"] = pa.array([[int(i) for i in frames] for frames in rows["sampled"]], pa.list_(pa.int32()))
            return encoded_rows(columns, self.schema)
        sampled = [int(n) if n >= 0 else None for n in rows["sampled_frames"]]
        columns.update({
            "spec": pa.array(rows["spec"], pa.int16()),
            "error_type": pa.array(rows["error_type"], pa.string()),
            "error_message": pa.array(rows["error_message"], pa.string()),
            "error_frames": pa.array([[int(i) for i in frames] for frames in rows["error_frames"]], pa.list_(pa.int32())),
            "retryable": pa.array(rows["retryable"], pa.bool_()),
            "error_attempt": pa.array(rows["attempt"], pa.int32()),
            "sampled_frames": pa.array(sampled, pa.int32()),
        })
        return encoded_rows(columns, self.schema)

    @torch.inference_mode()
    def reduce(self, images: torch.Tensor, view_frames: list[int], todo: list[list[list[int]]]) -> list[ReducedRows]:
        """``images [V, S, S, 3]`` uint8 views (host memory) → each method's rows: one tower forward, then the
        methods, on the encoder's device. ``view_frames[v]`` is view v's frame in the batch; ``todo[m]`` the
        batch frames method m reduces: per-frame methods each frame alone, temporal ones in runs of
        neighbouring sampled frames of one segment."""
        if self.encoder.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.encoder.device, non_blocking=True)
        out = self.encoder(self.preprocessing.normalize(images))
        results = []
        for spec, runs in zip(self.specs, todo):
            if not runs:
                results.append(ReducedRows([], [], [], [], [], [], []))
                continue
            wanted = {frame for run in runs for frame in run}
            views = [v for v, frame in enumerate(view_frames) if frame in wanted]
            kept = slice(None) if len(views) == len(view_frames) else torch.tensor(views, device=out.features.device)
            results.append(reduce_views(spec, out.features[kept], out.keys[kept], out.importance[kept],
                                        [view_frames[v] for v in views], runs, self.config.k_neighbors))
        return results

    def _encode(self, rows: dict[str, np.ndarray]) -> pa.Table:
        lengths = [len(indices) for indices in rows["frame_index"]]  # frames of each segment row
        frames = {name: np.concatenate([np.asarray(v) for v in rows[name]]) for name in FRAME_FIELDS}  # [F] each
        frames["row"] = np.repeat(np.arange(len(lengths)), lengths)  # [F]: the segment row of each frame
        view_frames = np.repeat(np.arange(len(frames["row"])), frames["views"]).tolist()  # [V]
        starts = np.cumsum([0, *lengths])
        todo = [[] for _ in self.specs]  # per method: runs of batch frames
        for r, reduce in enumerate(rows["reduce"]):
            position = {int(f): int(starts[r]) + i for i, f in enumerate(rows["frame_index"][r])}
            segment = [int(f) for f in rows["segment"][r]]
            following = dict(zip(segment, segment[1:]))  # each sampled frame's successor in the segment
            for spec, mine in enumerate(reduce):
                mine = [int(f) for f in mine]
                if not self.specs[spec].temporal:
                    todo[spec] += [[position[f]] for f in mine]
                    continue
                run: list[int] = []  # a frame failed for good between two frames ends a run
                previous = None
                for f in mine:
                    if run and following.get(previous) != f:
                        todo[spec].append(run)
                        run = []
                    run.append(position[f])
                    previous = f
                if run:
                    todo[spec].append(run)
        reduced = self.reduce(torch.from_numpy(np.concatenate(list(rows["pixels"]))), view_frames, todo)
        tables = [self._units(spec, result, rows, frames) for spec, result in enumerate(reduced) if result.row_frames]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _units(self, spec: int, reduced: ReducedRows, rows: dict[str, np.ndarray],
               frames: dict[str, np.ndarray]) -> pa.Table:
        """One method's units as encoded rows (one device-to-host copy per column). ``frames`` holds the batch's
        per-frame values (`FRAME_FIELDS`, and ``row``: its segment row). A unit is a frame (its views) for a
        per-frame method, a segment row (its windows) for a temporal one."""
        counts = np.array(reduced.row_views)  # views per output row
        num_tokens = np.array(reduced.num_tokens)  # [sum views]
        tokens = torch.cat(reduced.tokens).to(torch.float16).cpu().numpy()  # [sum n, C]
        positions = torch.cat(reduced.positions).cpu().numpy().astype(np.int16)  # [sum n]
        scores = torch.cat(reduced.scores).float().cpu().numpy()  # [sum n]
        numbers = frames["frame_index"].astype(np.int32)
        first = numbers[torch.cat(reduced.first_frames).cpu().numpy()]  # [sum n] source frame numbers
        last = numbers[torch.cat(reduced.last_frames).cpu().numpy()]
        heads = np.array([f[0] for f in reduced.row_frames])  # each output row's first frame (batch position)
        covered = np.concatenate(reduced.row_frames)  # batch frames of each output row, row after row
        sizes = np.array([len(f) for f in reduced.row_frames])
        view_rows = np.repeat(np.arange(len(heads)), counts)  # [sum views]: the output row of each view
        view_heads = heads[view_rows]  # [sum views]: its first frame
        source = frames["row"][view_heads]  # [sum views]: the segment row it came from
        if self.specs[spec].temporal:  # one unit per segment row: all its windows
            unit_of_view = source
        else:  # one unit per frame: all its views
            unit_of_view = view_rows
        boundaries = np.flatnonzero(np.diff(unit_of_view)) + 1
        unit_sizes = np.diff(np.concatenate([[0], boundaries, [len(unit_of_view)]]))  # views per unit
        unit_source = source[np.concatenate([[0], boundaries])]  # each unit's segment row
        infos = [json.loads(info) for info in rows["source_info"]]
        columns = {
            "frame_index": pa.array(numbers[view_heads], pa.int32()),
            "timestamp_s": pa.array(frames["timestamp_s"][view_heads], pa.float64()),
            "frame_indices": ragged(numbers[covered], sizes, pa.int32()).take(pa.array(view_rows)),
            "timestamps_s": ragged(frames["timestamp_s"][covered].astype(np.float64), sizes,
                                   pa.float64()).take(pa.array(view_rows)),
            "tile_index": pa.array(np.concatenate([np.arange(-1, n - 1) for n in counts]), pa.int16()),
            "grid_rows": pa.array(frames["grid_rows"][view_heads], pa.int16()),
            "grid_cols": pa.array(frames["grid_cols"][view_heads], pa.int16()),
            "num_tokens": pa.array(num_tokens, pa.int32()),
            "tokens": ragged(tokens, num_tokens, self.shard.field("tokens").type.value_type),
            "positions": ragged(positions, num_tokens, pa.int16()),
            "scores": ragged(scores, num_tokens, pa.float32()),
            "first_frames": ragged(first, num_tokens, pa.int32()),
            "last_frames": ragged(last, num_tokens, pa.int32()),
            "source_info": source_info_array([infos[r] for r in source]),
            "attempt": pa.array(rows["attempt"][source], pa.int32()),
        }
        units = {name: ragged(values, unit_sizes, self.schema.field(name).type.value_type)
                 for name, values in columns.items()}
        units["video_id"] = pa.array(rows["video_id"][unit_source], pa.string())
        units["source_path"] = pa.array(rows["source_path"][unit_source], pa.string())
        units["spec"] = pa.array(np.full(len(unit_sizes), spec), pa.int16())
        return encoded_rows(units, self.schema)
