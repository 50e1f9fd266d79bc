"""Build and run the Ray Data graph for one `EncodeConfig`; log it, record it, return the summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from operators.checkpoint import resolve_revision
from operators.preprocess import Preprocessing
from operators.towers import TowerInfo, describe_tower
from pipeline.config import EncodeConfig
from pipeline.commit import (UNREADABLE, CommitState, DamagedOutputError, committed_files, error_files,
                             merge_index_parts, prepare_output, read_error_rows)
from pipeline.inputs import VIDEO_ID_RULE, InputItem, Listing, filesystem_and_path, list_inputs, redact_credentials
from pipeline.lease import OutputLease, OutputLocked
from pipeline.report import failure_line
from pipeline.resources import ResourcePlan, ResourcesUnavailable, plan_resources
from pipeline.runlog import RunLog, new_run_id, plain_text, utc_timestamp, write_run_record
from pipeline.schema import SCHEMA_VERSION, differing_settings, read_file_metadata
from pipeline.sink import ShardSink, WriteStats
from pipeline.stages import DecodeInputs, EncodeTokens

ACTOR_RETRIES = 2
MAX_INPUT_BLOCKS = 4096  # inputs per block grow beyond this; a block's inputs are decoded one after the other
PACKAGES = ("torch", "transformers", "ray", "pyarrow", "einops", "av", "pillow", "numpy")

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one run did. Each input counts once: ``encoded`` (all its sampled frames are in shards),
    ``partly_failed`` (some frames in shards, some in errors, e.g. a damaged tail), ``failed`` (errors
    only), ``skipped`` (nothing left to do from earlier runs; ``skipped_failed`` of them have error
    rows), or ``missing`` (neither: a fault). ``duplicates``: names that listed an input already
    listed (another name for the same file); ``listing_notes``: lines, rows or folders the listing
    skipped (each named in the log)."""

    inputs: int
    duplicates: int
    listing_notes: int
    skipped: int
    skipped_failed: int
    encoded: int
    partly_failed: int
    failed: int
    missing: int
    frames: int
    rows: int
    error_rows: int
    mean_tokens_per_row: float
    frames_per_s: float
    bytes_written: int
    wall_s: float

    def lines(self) -> list[str]:
        failed_before = f", {self.skipped_failed} of them with error rows" if self.skipped_failed else ""
        lines = [
            f"inputs {self.inputs}: encoded {self.encoded}, partly failed {self.partly_failed}, failed {self.failed}, "
            f"skipped (already committed) {self.skipped}{failed_before}",
            f"frames {self.frames} ({self.rows} rows incl. tiles), mean tokens/row {self.mean_tokens_per_row:.1f}",
            f"{self.frames_per_s:.2f} frames/s over {self.wall_s:.1f} s, {self.bytes_written / 1e6:.2f} MB written, "
            f"{self.error_rows} error rows",
        ]
        if self.duplicates:
            lines.append(f"names of inputs already listed: {self.duplicates} (each file is encoded once; named in the log)")
        if self.listing_notes:
            lines.append(f"skipped while listing: {self.listing_notes} (lines, rows or folders; named in the log)")
        if self.missing:
            lines.append(f"inputs with neither tokens nor an error row: {self.missing} (named in the log)")
        return lines


def run_metadata(config: EncodeConfig, tower: TowerInfo, preprocessing: Preprocessing) -> dict:
    """What every shard records about how its tokens were made (``config`` resolved by `EncodeConfig.for_tower`)."""
    return {
        "media": config.media,
        "video_id_rule": VIDEO_ID_RULE,
        "model": config.model,
        "model_revision": config.model_revision,
        "tower": tower.family,
        "layer": config.layer,
        "hidden_size": tower.hidden_size,
        "patch_grid": [tower.grid_size, tower.grid_size],
        "patch_size": tower.patch_size,
        "method": config.method,
        "method_params": {"budget": config.budget, "k_neighbors": config.k_neighbors, "importance": config.importance},
        "preprocessing": {
            **preprocessing.to_metadata(),
            "anyres": config.anyres,
            "pinpoints": config.pinpoints if config.anyres else None,
        },
        "sampling": {"num_frames": config.num_frames, "fps": config.fps, "max_frames": config.max_frames,
                     # only when on: outputs written before the option existed stay resumable
                     **({"key_frames": True, "key_frame_tolerance_s": config.key_frame_tolerance_s}
                        if config.key_frames else {})},
    }


def check_output_compatible(output: str, metadata: dict) -> None:
    """Refuse to add tokens made another way to an existing output (mixed shards mislead readers).

    The first readable index file (else error file: an output whose every input failed; else a shard
    not yet indexed) says how the output was made; an error file without metadata was written before
    error files carried it. Unreadable files are passed over here: the run reports them once it holds
    the output (`pipeline.commit.prepare_output`, exit 4).

    Raises:
        ValueError: the output's files were made with other settings, or by an older version.
    """
    fs, root = filesystem_and_path(output)
    for sub in ("index", "errors", "shards"):
        for path in committed_files(fs, root, sub):
            try:
                with fs.open_input_file(path) as handle:
                    existing = read_file_metadata(pq.read_schema(handle))
            except UNREADABLE:
                continue
            _refuse_other_settings(output, existing, {"schema_version": SCHEMA_VERSION, **metadata})
            return


def _refuse_other_settings(output: str, existing: dict, expected: dict) -> None:
    output = redact_credentials(output)
    if not existing:
        raise ValueError(f"{output} holds files of an older version, which record no settings and made video ids "
                         "another way: the same inputs would be encoded again under new ids. Use a new --output.")
    differing = differing_settings(existing, expected)
    if not differing:
        return
    lines = "".join(f"\n  {key}: existing {existing.get(key)!r}, this run {expected.get(key)!r}" for key in differing)
    if "video_id_rule" in differing:
        why = ("\nIt was written by an older version, whose video ids are made another way: the same inputs would "
               "be encoded again under new ids. Use a new --output.")
    elif "schema_version" in differing:
        why = (f"\nIt was written by another version (schema {existing.get('schema_version')!r}; this one writes "
               f"{expected['schema_version']!r}), which this one cannot add to. Use a new --output (that version's "
               "reader reads the old one).")
    else:
        why = "\nUse a new --output, or the same settings to resume."
    raise ValueError(f"{output} already holds files made with different settings:{lines}{why}")


def recorded_config(config: EncodeConfig) -> dict:
    """The config as the run record keeps it: credentials in URIs (``s3://KEY:SECRET@...``) replaced by ``***``."""
    return {name: redact_credentials(value) if isinstance(value, str) else value
            for name, value in config.to_dict().items()}


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
        # RAY_ADDRESS (set by `ray job submit`) or --ray-address joins a cluster; otherwise Ray starts locally,
        # under a watchdog that ends its processes if this one dies, even by SIGKILL (pipeline/embedded_ray.py).
        # Workers' output (tracebacks, decoder messages) is streamed to this driver and its run log.
        from pipeline.embedded_ray import init_ray

        # "local": a new Ray even when /tmp/ray names a cluster started by `ray start` (maybe long dead),
        # which a bare ray.init() would try to join.
        init_ray(address=config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def pending_rows(inputs: list[InputItem], state: CommitState) -> list[dict]:
    """Input rows still to process, each carrying the frames earlier runs committed or recorded as failed.

    An input is finished (and not read again) when it failed as a whole, or when every frame its
    sampling selected is in the shards or the errors (`CommitState.finished`)."""
    rows = []
    for item in inputs:
        if state.finished(item.video_id):
            continue
        rows.append(
            {
                "video_id": item.video_id,
                "source_path": item.source_path,
                "path": item.path,
                "filesystem": item.filesystem,
                "problem": item.problem,
                "done_frames": sorted(state.done.get(item.video_id, ())),
                "failed_frames": sorted(state.failed.get(item.video_id) or ()),
            }
        )
    return rows


def build_dataset(rows: list[dict], config: EncodeConfig, preprocessing: Preprocessing,
                  filesystems: dict[str, pafs.FileSystem],
                  plan: ResourcePlan, encoder_stage: type = EncodeTokens) -> ray.data.Dataset:
    """inputs (up to `MAX_INPUT_BLOCKS` blocks) → decode (CPU actor pool, each input read once, frames
    streamed) → encode (actor pool of ``encoder_stage``, `EncodeTokens` or a stand-in with its interface),
    sized and placed by ``plan``.

    Retries are bounded: an actor that dies is restarted, and its task retried, ``ACTOR_RETRIES`` times;
    after that the run fails (a poison input cannot loop it: the decoder's own crashes are error rows)."""
    retries = {"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES}
    with warnings.catch_warnings():
        # Ray Data's own default is unbounded (-1); the keyword form is the only way to bound it (Ray < 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        return (
            ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_INPUT_BLOCKS))
            .flat_map(
                DecodeInputs,
                fn_constructor_kwargs={"config": config, "preprocessing": preprocessing, "filesystems": filesystems},
                # one input at a time per actor: inputs never queue behind one whose decoder hangs. A fixed
                # size: Ray (2.60) grows a pool only above 175 % use, which one task per actor never reaches.
                compute=ray.data.ActorPoolStrategy(size=min(plan.decoders, len(rows)), max_tasks_in_flight_per_actor=1),
                num_cpus=1,
                **retries,
            )
            .map_batches(
                encoder_stage,
                fn_constructor_kwargs={"config": config, "preprocessing": preprocessing, "threads": plan.encoder_threads},
                batch_size=config.batch_size,
                compute=ray.data.ActorPoolStrategy(
                    size=plan.encoders, max_concurrent_calls_per_actor=plan.encoder_calls,
                    enable_true_multi_threading=plan.encoder_calls > 1),
                num_gpus=plan.encoder_gpus,
                num_cpus=plan.encoder_cpus,
                batch_format="numpy",
                **retries,
            )
        )


class RunSetupError(Exception):
    """The run could not start: the settings do not fit the model, the input is missing, unreadable or
    holds no media, the output cannot be written, or it holds shards made with other settings. No work
    was done and nothing was written (where the output is only partly writable, an empty log file may
    be left)."""


class OutputBusy(RunSetupError):
    """Another job holds the output's lease (`pipeline.lease`); nothing was written."""


class RunFailed(RuntimeError):
    """The run started (it has an id, a log and a record) and then failed; ``__cause__`` says why."""

    def __init__(self, run_id: str, log: str, cause: BaseException) -> None:
        super().__init__(f"run {run_id} failed: {brief(cause)} (traceback in {log})")
        self.run_id = run_id
        self.log = log


def brief(error: BaseException) -> str:
    """``Type: first line ... last line`` of an error, each at most 300 characters, colour codes and
    credentials in URIs removed. Ray's errors carry a whole remote traceback whose last line names the
    original exception."""
    lines = [line for line in redact_credentials(plain_text(str(error))).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = f" ... {lines[-1].strip()[:300]}" if len(lines) > 1 else ""
    return f"{type(error).__name__}: {lines[0].strip()[:300]}{last}"


def run(config: EncodeConfig, encoder_stage: type = EncodeTokens) -> RunSummary:
    """Encode every input of ``config`` into ``config.output``; inputs already committed are skipped.

    Checks that need no Ray (the model's config, the output's settings, the input listing) run first.
    Then the run gets an id and takes the output's lease (one job per output); its log goes to
    ``OUT/logs/<run-id>.log`` and its record (config, versions, summary, status) to ``OUT/runs/<run-id>.json`` and
    ``OUT/manifest.json``: written at the start with status ``running``, and again when the run
    completes, fails or is interrupted. Every error row the run commits is logged with its reason, also
    when it stops early.

    Raises:
        ModelUnavailableError: the model's config cannot be loaded.
        OutputBusy: another job holds the output (its lease, `pipeline.lease`); nothing was written.
        RunSetupError: the run could not start (see there); nothing was written.
        RunFailed: the run failed after it started; its record says ``failed``. Its ``__cause__`` is a
            `pipeline.commit.DamagedOutputError` when committed files of the output are damaged, a
            `pipeline.resources.ResourcesUnavailable` when the cluster cannot hold the actors asked for
            (or no GPU came for ``--device cuda``).
        KeyboardInterrupt, SystemExit: the run was interrupted (Ctrl-C, SIGTERM); its record says so.

    ``encoder_stage`` replaces `EncodeTokens` (same constructor and call): the benchmarks' stand-in for a
    GPU-class encoder (``benchmarks/bench_standin.py``).
    """
    started = time.time()
    if os.path.isdir(config.model):  # one name for a local folder (`clip/`, `./clip`, a link to it)
        config = dataclasses.replace(config, model=os.path.realpath(config.model))
    try:
        # Pinned once here; every encoder actor loads exactly this revision (`operators.checkpoint`).
        config = dataclasses.replace(config, model_revision=resolve_revision(config.model, config.model_revision))
    except ValueError as error:  # a local checkpoint that is not the one --model-revision names
        raise RunSetupError(str(error)) from error
    try:
        # the configs only (no weights), before Ray starts; a local folder was just fingerprinted, not again
        tower = describe_tower(config.model, None if os.path.isdir(config.model) else config.model_revision)
        config = config.for_tower(tower)
    except ValueError as error:  # not a tower the job runs, or settings it cannot serve
        raise RunSetupError(str(error)) from error
    preprocessing = config.preprocessing(tower)
    metadata_ = run_metadata(config, tower, preprocessing)
    try:
        check_output_compatible(config.output, metadata_)
        logger.info("listing inputs of %s", redact_credentials(config.input))
        listing = list_inputs(config.input, config.media)
    except (OSError, ValueError) as error:
        raise RunSetupError(str(error)) from error
    if not listing.items:
        skipped = "".join(f"\n  skipped: {note}" for note in listing.notes[:20])
        if len(listing.notes) > 20:
            skipped += f"\n  ... and {len(listing.notes) - 20} more"
        raise RunSetupError(f"--input {redact_credentials(config.input)!r} holds no {config.media} files{skipped}")

    run_id = new_run_id(started)
    lease = OutputLease(config.output, run_id)
    try:
        lease.acquire()
    except OutputLocked as error:
        raise OutputBusy(str(error)) from error
    except OSError as error:
        raise RunSetupError(f"cannot write to the output {redact_credentials(config.output)}: {error}") from error
    try:
        return _run_holding_lease(config, listing, preprocessing, metadata_, run_id, started, lease, encoder_stage)
    finally:
        lease.release()


def _run_holding_lease(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing, metadata_: dict, run_id: str,
                       started: float, lease: OutputLease, encoder_stage: type) -> RunSummary:
    """`run` from the moment the run has an id and holds the output: record, log, encode, record."""
    record = {
        "run_id": run_id,
        "status": "running",
        "schema_version": SCHEMA_VERSION,
        "config": recorded_config(config),
        "run_metadata": metadata_,
        "versions": package_versions(),
        "command": [redact_credentials(arg) for arg in sys.argv],
        "started_at": utc_timestamp(started),
    }
    run_log = RunLog(config.output, run_id, config.log_level)
    record["log"] = run_log.path
    try:
        run_log.open()
        write_run_record(config.output, run_id, record)  # also proves the output can be written
    except (OSError, ValueError) as error:
        run_log.close()
        raise RunSetupError(f"cannot write to the output {redact_credentials(config.output)}: {error}") from error
    with run_log:
        logger.info("run %s: %s job, output %s, log %s", run_id, config.media, redact_credentials(config.output),
                    run_log.path)
        sampling = f", sampling {metadata_['sampling']}" if config.media == "video" else ""
        logger.info("model %s (%s tower, %s px, %s patches), layer %d, method %s %s, preprocessing %s%s", config.model,
                    metadata_["tower"], metadata_["preprocessing"]["image_size"],
                    "x".join(map(str, metadata_["patch_grid"])), config.layer, config.method,
                    metadata_["method_params"], preprocessing, sampling)
        errors_before: set[str] = set()
        failures_logged = False
        ray_was_running = ray.is_initialized()
        try:
            errors_before = error_files(config.output)
            _log_listing(listing)
            summary, config = _encode(config, listing, preprocessing, metadata_, started, run_id, encoder_stage)
            _merge_index(config.output, run_id)
            lease.check()
            _log_failures(config.output, errors_before)
            failures_logged = True
            for line in summary.lines():
                logger.info("%s", line)
            path = write_run_record(config.output, run_id, {
                **record, "config": recorded_config(config), "status": "completed", "summary": asdict(summary),
                "finished_at": utc_timestamp(time.time())})
            logger.info("run record %s", path)
        except BaseException as error:
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            run_log.settle()
            if not ray_was_running and ray.is_initialized():
                ray.shutdown()  # the Ray this run started: stop its tasks, so none commits after the list below
            if not failures_logged:
                _log_failures(config.output, errors_before)
            if not lease.lost:
                _merge_index(config.output, run_id)
            if interrupted:
                logger.error("run %s interrupted (%r)", run_id, error)
            elif isinstance(error, (DamagedOutputError, ResourcesUnavailable)):  # not a fault of the code: no traceback
                logger.error("run %s failed: %s", run_id, error)
            else:
                logger.exception("run %s failed: %s", run_id, type(error).__name__)
            try:
                write_run_record(config.output, run_id, {
                    **record, "status": "interrupted" if interrupted else "failed", "error": brief(error),
                    "finished_at": utc_timestamp(time.time())})
            except Exception as record_error:  # noqa: BLE001 - the run's own error is the one to raise
                logger.error("cannot write the run record: %s", brief(record_error))
            if interrupted:
                raise
            raise RunFailed(run_id, run_log.path, error) from error
    return summary


def _merge_index(output: str, run_id: str) -> None:
    """Merge this run's index parts into one file (best effort: unmerged parts are read as well)."""
    try:
        merged = merge_index_parts(*filesystem_and_path(output), run_id)
        logger.debug("merged %d index parts into index/run-%s.parquet", merged, run_id)
    except (OSError, ValueError) as error:
        logger.warning("cannot merge the index parts of %s (readers read them unmerged): %s", output, brief(error))


def _encode(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing, metadata_: dict,
            started: float, run_id: str, encoder_stage: type) -> tuple[RunSummary, EncodeConfig]:
    """Make the output consistent (`prepare_output`), plan against what earlier runs committed, run the
    graph, and summarise.

    Returns the summary and the config with the encoder device that was chosen filled in."""
    prepared = prepare_output(config.output, metadata_, config.set_aside_damaged)
    if prepared.temporaries_removed:
        logger.info("removed %d temporary files left by an interrupted run", prepared.temporaries_removed)
    if prepared.adopted:
        logger.info("committed %d shard(s) an interrupted run wrote but did not index", len(prepared.adopted))
    for path in prepared.set_aside:
        logger.warning("set aside damaged %s", path)
    inputs = listing.items
    state = prepared.state
    rows = pending_rows(inputs, state)
    _log_plan(inputs, rows, state.failed, config.media)

    # the most views a frame has: the global view and the largest AnyRes grid
    views = 1 + max(w * h for w, h in config.pinpoint_list()) // preprocessing.image_size**2 if config.anyres else 1
    sink = ShardSink(config.output, metadata_, run_id, config.frames_per_shard, int(config.shard_mb * 2**20), views)
    if rows:
        _ensure_ray(config)
        plan = plan_resources(config.device, config.num_encoders, config.encoder_threads, config.num_decoders,
                              config.gpu_wait_s)
        config = dataclasses.replace(config, device=plan.device)
        logger.info("Ray at %s: %s", ray.get_runtime_context().gcs_address, plan.describe())
        # Writes hold no CPU: the decoder and encoder actors hold theirs for the whole run, and a write
        # that waits for a free CPU would keep every shard in memory until the end (nothing committed).
        build_dataset(rows, config, preprocessing, listing.filesystems, plan, encoder_stage).write_datasink(
            sink, ray_remote_args={"num_cpus": 0})
    return summarize_run(listing, rows, state, sink.stats, time.time() - started), config


def _log_listing(listing: Listing) -> None:
    for name, source_path in listing.duplicates:
        logger.warning("listed again: %s names the input %s (encoded once)", name, source_path)
    for note in listing.notes:
        logger.warning("skipped while listing: %s", note)


def _log_plan(inputs: list[InputItem], rows: list[dict], failed: dict, media: str) -> None:
    for item in inputs:
        logger.debug("input %s: %s", item.video_id, item.source_path)
    todo = {row["video_id"] for row in rows}
    skipped = [item for item in inputs if item.video_id not in todo]
    failed_before = sum(1 for item in skipped if item.video_id in failed)
    if media == "video":
        resumed = [row for row in rows if row["done_frames"] or row["failed_frames"]]
        logger.info("inputs: %d found, %d to read (%d with frames from earlier runs: only frames in neither "
                    "shards nor errors are encoded)", len(inputs), len(rows), len(resumed))
        for row in resumed:
            logger.debug("resuming %s: %d frames in shards, %d in errors", row["source_path"],
                         len(row["done_frames"]), len(row["failed_frames"]))
    else:
        logger.info("inputs: %d found, %d to encode, %d already encoded", len(inputs), len(rows),
                    len(skipped) - failed_before)
    if failed_before:
        logger.info("inputs skipped as failed in an earlier run: %d (recorded failures are not retried; delete "
                    "their error files to retry)", failed_before)


def _log_failures(output: str, before: set[str]) -> None:
    """Log each error row committed since ``before`` (the error files that existed then), one line each."""
    try:
        failures = read_error_rows(output, error_files(output) - before)
    except Exception as error:  # noqa: BLE001 - a report, not the run's work: never mask the run's outcome
        logger.warning("cannot read this run's error rows back from %s: %s", output, brief(error))
        return
    for failure in failures:
        logger.warning("failed: %s", failure_line(failure))


def summarize_run(listing: Listing, rows: list[dict], state: CommitState, stats: WriteStats,
                  wall_s: float) -> RunSummary:
    """Count each input once, by what the output holds for it now (earlier runs' commits included)."""
    inputs = listing.items
    touched = stats.encoded_videos | stats.failed_videos
    with_tokens = set(state.frames) | stats.encoded_videos
    with_errors = set(state.failed) | stats.failed_videos
    seen_before = {item.video_id for item in inputs} & (set(state.frames) | set(state.failed))
    accounted = touched | seen_before
    missing = [row for row in rows if row["video_id"] not in accounted]
    for row in missing:
        logger.error("%s ended in neither shards nor errors (no frame was sampled or decoded)", row["source_path"])
    return RunSummary(
        inputs=len(inputs),
        duplicates=len(listing.duplicates),
        listing_notes=len(listing.notes),
        skipped=len(seen_before - touched),
        skipped_failed=len((seen_before - touched) & set(state.failed)),
        encoded=len(touched - with_errors),
        partly_failed=len(touched & with_tokens & with_errors),
        failed=len(touched & with_errors - with_tokens),
        missing=len(missing),
        frames=stats.frames,
        rows=stats.rows,
        error_rows=stats.error_rows,
        mean_tokens_per_row=stats.tokens / stats.rows if stats.rows else 0.0,
        frames_per_s=stats.frames / wall_s if wall_s else 0.0,
        bytes_written=stats.bytes,
        wall_s=wall_s,
    )

