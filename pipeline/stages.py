"""The Ray Data stages, as plain functions and one callable class on rows/batches.

plan_input   (CPU task, one input row → segment rows): probe once, sample frames, drop frames an
             earlier run committed, cut the rest into segments of `segment_frames`.
decode_segment (CPU task, one segment row → frame rows): decode at the model's size, crop/pad or
             AnyRes-tile; each frame row carries ``pixels [T, S, S, 3]`` uint8 (T views: global first).
EncodeTokens (actor, batch of frame rows → Arrow table): CLIP once plus PruMerge on one device.

A failure becomes a row with ``error_type``/``message`` set that flows on to the sink's error table;
it never raises out of a stage, so one bad input cannot stop the job.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import torch

from operators.decode import MediaError, decode_segments, probe_video
from operators.encode import ClipEncoder
from operators.images import load_image
from operators.preprocess import Preprocessing
from operators.prumerge import prumerge
from operators.sampling import FrameSampling, sample_frame_indices
from operators.tiles import anyres_decode_size, anyres_tiles
from pipeline.config import EncodeConfig
from pipeline.inputs import local_file
from pipeline.schema import encoded_schema, failure_table, ragged, shard_schema, with_error_columns

NO_ERROR = {"error_type": "", "error_message": "", "failed_frames": []}

logger = logging.getLogger(__name__)


def error_fields(source_path: str, error: BaseException, frame_indices=()) -> dict:
    """The error columns a failed row carries to the sink: type, reason, and the frames it covers.

    A `MediaError` is the input's fault and its reason says why. Anything else is unexpected, so its
    traceback is logged here, on the worker; Ray streams it to the driver's console and run log.
    """
    if isinstance(error, MediaError):
        reason = error.reason
    else:
        reason = f"{error}".strip() or repr(error)
        logger.warning("%s: unexpected %s", source_path, type(error).__name__, exc_info=error)
    return {"error_type": type(error).__name__, "error_message": reason, "failed_frames": [int(i) for i in frame_indices]}


def plan_input(row: dict, config: EncodeConfig) -> list[dict]:
    """Segment rows for one input (``video_id``, ``source_path``, ``done_frames``, ``failed_frames``)."""
    base = {"video_id": row["video_id"], "source_path": row["source_path"], "width": 0, "height": 0}
    if config.media == "image":
        return [{**base, "segment": [0], **NO_ERROR}]
    try:
        with local_file(row["source_path"]) as path:
            info = probe_video(path)
        sampling = FrameSampling(num_frames=config.num_frames, fps=config.fps, max_frames=config.max_frames)
        frames = sample_frame_indices(info, sampling)
    except Exception as error:  # noqa: BLE001 - any failure of one input is that input's error row
        return [{**base, "segment": [], **error_fields(row["source_path"], error)}]
    skip = set(row["done_frames"]) | set(row["failed_frames"])
    todo = [int(i) for i in frames if int(i) not in skip]
    base.update(width=info.width, height=info.height)
    step = config.segment_frames
    return [{**base, "segment": todo[i : i + step], **NO_ERROR} for i in range(0, len(todo), step)]


class DecodeSegment:
    """Decode one segment row into frame rows with model-sized uint8 pixels."""

    def __init__(self, config: EncodeConfig, image_size: int) -> None:
        self.config = config
        self.image_size = image_size
        self.preprocessing = Preprocessing(mode=config.preprocess, image_size=image_size)
        self.pinpoints = config.pinpoint_list()

    def __call__(self, row: dict) -> list[dict]:
        if row["error_type"]:
            return [self._failed(row, row)]
        try:
            with local_file(row["source_path"]) as path:
                if self.config.media == "image":
                    return [self._image_row(row, load_image(path, self.config.max_image_pixels))]
                return self._video_rows(row, path)
        except Exception as error:  # noqa: BLE001
            frames = row["segment"] if self.config.media == "video" else ()
            return [self._failed(row, error_fields(row["source_path"], error, frames))]

    def _video_rows(self, row: dict, path: str) -> list[dict]:
        width, height = row["width"], row["height"]
        if self.config.anyres:
            size = anyres_decode_size(width, height, self.pinpoints)
        else:
            size = self.preprocessing.decode_size(width, height)
        rows = []
        for segment in decode_segments(path, np.asarray(row["segment"]), size, self.config.segment_frames):
            for frame, index, timestamp in zip(segment.frames, segment.frame_indices, segment.timestamps_s):
                rows.append(self._frame_row(row, frame, int(index), float(timestamp), (width, height)))
        return rows

    def _image_row(self, row: dict, image: np.ndarray) -> dict:
        height, width = image.shape[:2]
        return self._frame_row(row, image, 0, 0.0, (width, height))

    def _frame_row(self, row: dict, frame: np.ndarray, index: int, timestamp: float, source_size) -> dict:
        if self.config.anyres:
            tiles = anyres_tiles(frame, self.image_size, self.pinpoints, source_size=source_size)
            pixels, rows, cols = tiles.pixels.numpy(), tiles.grid_rows, tiles.grid_cols
        else:
            pixels, rows, cols = self.preprocessing.square(frame[None]).numpy(), 1, 1
        return {
            "video_id": row["video_id"],
            "source_path": row["source_path"],
            "frame_index": index,
            "timestamp_s": timestamp,
            "grid_rows": rows,
            "grid_cols": cols,
            "pixels": np.ascontiguousarray(pixels),  # [T, S, S, 3] uint8, global view first
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
            "pixels": np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
            "error_type": error["error_type"],
            "error_message": error["error_message"],
            "failed_frames": list(error["failed_frames"]),
        }


def decode_segment(row: dict, config: EncodeConfig, image_size: int) -> list[dict]:
    """Ray task body (`flat_map`): one segment row → its frame rows, or one failure row."""
    return DecodeSegment(config, image_size)(row)


class EncodeTokens:
    """Ray actor: loads the tower once, then CLIP once + PruMerge per batch, on the same device."""

    def __init__(self, config: EncodeConfig) -> None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(config.encoder_threads or os.cpu_count() or 1)
        self.config = config
        self.encoder = ClipEncoder(
            config.model,
            layer=config.layer,
            device=device,
            dtype=getattr(torch, config.dtype) if config.dtype else None,
            cls_attention=config.cls_attention,
        )
        self.preprocessing = Preprocessing(mode=config.preprocess, image_size=self.encoder.image_size)
        self.schema = shard_schema(self.encoder.hidden_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Frame rows → one row per view (tokens set) plus one row per failure (error columns set)."""
        failed = np.array([bool(t) for t in batch["error_type"]], dtype=bool)
        tables = [self._encode({key: values[~failed] for key, values in batch.items()})] if (~failed).any() else []
        if failed.any():
            tables.append(failure_table({key: values[failed] for key, values in batch.items()}, self.schema))
        return pa.concat_tables(tables) if tables else encoded_schema(self.schema).empty_table()

    @torch.inference_mode()
    def _encode(self, frames: dict[str, np.ndarray]) -> pa.Table:
        views = [np.asarray(pixels) for pixels in frames["pixels"]]  # each [T_i, S, S, 3] uint8
        counts = [len(v) for v in views]
        images = torch.from_numpy(np.concatenate(views))  # [sum T, S, S, 3] uint8
        if self.encoder.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.encoder.device, non_blocking=True)
        out = self.encoder(self.preprocessing.normalize(images))
        reduced = prumerge(
            out.features, out.keys, out.cls_attn,
            mode=self.config.method, budget=self.config.budget, k_neighbors=self.config.k_neighbors,
        )
        # One device-to-host copy per column for the whole batch.
        num_tokens = np.array(reduced.num_tokens)
        tokens = torch.cat(reduced.tokens).to(torch.float16).cpu().numpy()  # [sum n_i, C]
        positions = torch.cat(reduced.positions).cpu().numpy().astype(np.int16)  # [sum n_i]
        scores = torch.cat(reduced.scores).cpu().numpy()  # [sum n_i]

        def per_view(column: str) -> np.ndarray:
            return np.repeat(frames[column], counts)

        shard = pa.Table.from_arrays(
            [
                pa.array(per_view("video_id"), pa.string()),
                pa.array(per_view("source_path"), pa.string()),
                pa.array(per_view("frame_index"), pa.int32()),
                pa.array(per_view("timestamp_s"), pa.float64()),
                pa.array(np.concatenate([np.arange(-1, n - 1) for n in counts]), pa.int16()),
                pa.array(per_view("grid_rows"), pa.int16()),
                pa.array(per_view("grid_cols"), pa.int16()),
                pa.array(num_tokens, pa.int32()),
                ragged(tokens, num_tokens, self.schema.field("tokens").type.value_type),
                ragged(positions, num_tokens, pa.int16()),
                ragged(scores, num_tokens, pa.float32()),
            ],
            schema=self.schema,
        )
        return with_error_columns(shard)
