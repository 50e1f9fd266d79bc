"""Build and run the Ray Data graph for one `EncodeConfig`; write the manifest; return the summary."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from transformers import CLIPVisionConfig

from operators.encode import load_vision_config
from pipeline.config import EncodeConfig
from pipeline.inputs import InputItem, filesystem_and_path, list_inputs, read_committed
from pipeline.schema import SCHEMA_VERSION, read_file_metadata
from pipeline.sink import ShardSink, remove_stale_temporaries
from pipeline.stages import EncodeTokens, decode_segment, plan_input

MAX_INPUT_BLOCKS = 1024  # probing runs this many tasks at most; each probes its share of the inputs
PACKAGES = ("torch", "transformers", "decord", "ray", "pyarrow", "einops", "av", "pillow", "numpy")


@dataclass
class RunSummary:
    inputs: int
    skipped: int
    encoded: int
    failed: int
    frames: int
    rows: int
    error_rows: int
    mean_tokens_per_row: float
    frames_per_s: float
    bytes_written: int
    wall_s: float

    def lines(self) -> list[str]:
        return [
            f"inputs {self.inputs}: encoded {self.encoded}, failed {self.failed}, skipped (already committed) {self.skipped}",
            f"frames {self.frames} ({self.rows} rows incl. tiles), mean tokens/row {self.mean_tokens_per_row:.1f}",
            f"{self.frames_per_s:.2f} frames/s over {self.wall_s:.1f} s, {self.bytes_written / 1e6:.2f} MB written, "
            f"{self.error_rows} error rows",
        ]


def run_metadata(config: EncodeConfig, vision: CLIPVisionConfig) -> dict:
    """What every shard records about how its tokens were made."""
    grid = vision.image_size // vision.patch_size
    return {
        "model": config.model,
        "model_revision": getattr(vision, "_commit_hash", None),
        "layer": config.layer,
        "hidden_size": vision.hidden_size,
        "patch_grid": [grid, grid],
        "method": config.method,
        "method_params": {"budget": config.budget, "k_neighbors": config.k_neighbors, "cls_attention": config.cls_attention},
        "preprocessing": {
            "mode": config.preprocess,
            "image_size": vision.image_size,
            "anyres": config.anyres,
            "pinpoints": config.pinpoints if config.anyres else None,
        },
        "sampling": {"num_frames": config.num_frames, "fps": config.fps, "max_frames": config.max_frames},
    }


def check_output_compatible(output: str, metadata: dict) -> None:
    """Refuse to add tokens made another way to an existing output (mixed shards mislead readers)."""
    fs, root = filesystem_and_path(output)
    directory = f"{root}/shards"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(directory)):
        if info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
            with fs.open_input_file(info.path) as handle:
                existing = read_file_metadata(pq.read_schema(handle))
            expected = {"schema_version": SCHEMA_VERSION, **metadata}
            existing.pop("model_revision", None), expected.pop("model_revision", None)
            if existing != expected:
                raise ValueError(
                    f"{output} already holds shards made with different settings:\n  existing {existing}\n"
                    f"  this run {expected}\nUse a new --output, or the same settings to resume."
                )
            return


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _ensure_ray(config: EncodeConfig) -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) or --ray-address joins a cluster; otherwise Ray starts locally.
        ray.init(address=config.ray_address, log_to_driver=False)


def _encoder_resources(config: EncodeConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else CPU actors."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = config.device != "cpu" and gpus > 0
    actors = config.num_encoders or (gpus if use_gpu else 1)
    return actors, (1.0 if use_gpu else 0.0)


def pending_rows(inputs: list[InputItem], done: dict, failed: dict, media: str) -> list[dict]:
    """Input rows still to process, each carrying the frames earlier runs committed or recorded as failed."""
    rows = []
    for item in inputs:
        whole_input_failed = item.video_id in failed and failed[item.video_id] is None
        if whole_input_failed or (media == "image" and item.video_id in done):
            continue  # nothing left to do for it
        rows.append(
            {
                "video_id": item.video_id,
                "source_path": item.source_path,
                "done_frames": sorted(done.get(item.video_id, ())),
                "failed_frames": sorted(failed.get(item.video_id) or ()),
            }
        )
    return rows


def build_dataset(rows: list[dict], config: EncodeConfig, image_size: int, actors: int, gpus: float) -> ray.data.Dataset:
    """inputs → plan (CPU tasks) → one segment per block → decode (CPU tasks) → encode (actor pool)."""
    return (
        ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_INPUT_BLOCKS))
        .flat_map(plan_input, fn_kwargs={"config": config})
        .repartition(target_num_rows_per_block=1)  # each segment its own decode task
        .flat_map(decode_segment, fn_kwargs={"config": config, "image_size": image_size})
        .map_batches(
            EncodeTokens,
            fn_constructor_kwargs={"config": config},
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=1,
            batch_format="numpy",
        )
    )


def run(config: EncodeConfig) -> RunSummary:
    """Encode every input of ``config`` into ``config.output``; inputs already committed are skipped."""
    started = time.time()
    vision = load_vision_config(config.model)  # fails fast, before Ray starts, without the model
    metadata_ = run_metadata(config, vision)
    check_output_compatible(config.output, metadata_)
    remove_stale_temporaries(config.output)

    inputs = list_inputs(config.input, config.media)
    done, failed = read_committed(config.output)
    rows = pending_rows(inputs, done, failed, config.media)

    sink = ShardSink(config.output, metadata_, config.rows_per_shard)
    if rows:
        _ensure_ray(config)
        actors, gpus = _encoder_resources(config)
        config = dataclasses.replace(config, device=config.device or ("cuda" if gpus else "cpu"))
        build_dataset(rows, config, vision.image_size, actors, gpus).write_datasink(sink)

    wall = time.time() - started
    stats = sink.stats
    seen_before = {item.video_id for item in inputs} & (set(done) | set(failed))
    summary = RunSummary(
        inputs=len(inputs),
        skipped=len(seen_before - stats.encoded_videos - stats.failed_videos),
        encoded=len(stats.encoded_videos),
        failed=len(stats.failed_videos),
        frames=len(stats.frames),
        rows=stats.rows,
        error_rows=stats.error_rows,
        mean_tokens_per_row=stats.tokens / stats.rows if stats.rows else 0.0,
        frames_per_s=len(stats.frames) / wall if wall else 0.0,
        bytes_written=stats.bytes,
        wall_s=wall,
    )
    write_manifest(config, metadata_, summary)
    return summary


def write_manifest(config: EncodeConfig, metadata_: dict, summary: RunSummary) -> None:
    """``OUT/manifest.json``: config, run metadata, package versions, this run's counts and timings."""
    fs, root = filesystem_and_path(config.output)
    fs.create_dir(root, recursive=True)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "config": config.to_dict(),
        "run_metadata": metadata_,
        "versions": package_versions(),
        "command": sys.argv,
        "summary": asdict(summary),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    temporary = f"{root}/.manifest.json.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(manifest, indent=2, default=str).encode())
    fs.move(temporary, f"{root}/manifest.json")
