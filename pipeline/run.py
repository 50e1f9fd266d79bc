"""Build and run the Ray Data graph for one `EncodeConfig`; log it, record it, return the summary."""

from __future__ import annotations

import dataclasses
import json
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
from operators.methods import HOLITOM_DEFAULTS, MethodSpec
from operators.preprocess import Preprocessing
from operators.towers import TowerInfo, describe_tower
from pipeline.config import EncodeConfig
from pipeline.commit import (UNREADABLE, CommitState, DamagedOutputError, committed_files, error_files,
                             merge_index_parts, method_folders, prepare_output, read_error_rows)
from pipeline.inputs import VIDEO_ID_RULE, InputItem, Listing, filesystem_and_path, list_inputs, redact_credentials
from pipeline.lease import OutputLeases, OutputLocked
from pipeline.report import failure_line
from pipeline.resources import ResourcePlan, ResourcesUnavailable, plan_resources
from pipeline.runlog import RunLog, new_run_id, plain_text, utc_timestamp, write_run_record
from pipeline.schema import READABLE_VERSIONS, SCHEMA_VERSION, differing_settings, read_file_metadata
from pipeline.sink import ShardSink, SinkOutput, WriteStats
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
    methods: dict[str, dict] = dataclasses.field(default_factory=dict)  # several methods: each one's summary

    def lines(self) -> list[str]:
        failed_before = f", {self.skipped_failed} of them with error rows" if self.skipped_failed else ""
        counts = (f"frames {self.frames}, by method:" if self.methods else
                  f"frames {self.frames} ({self.rows} rows incl. tiles), mean tokens/row {self.mean_tokens_per_row:.1f}")
        lines = [
            f"inputs {self.inputs}: encoded {self.encoded}, partly failed {self.partly_failed}, failed {self.failed}, "
            f"skipped (already committed) {self.skipped}{failed_before}",
            counts,
            *(f"  {method}: frames {m['frames']}, {m['rows']} rows, mean tokens/row {m['mean_tokens_per_row']:.1f}, "
              f"{m['bytes_written'] / 1e6:.2f} MB, {m['error_rows']} error rows" for method, m in self.methods.items()),
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


def method_params(config: EncodeConfig, spec: MethodSpec) -> dict:
    """What a method's output records about its parameters (per-frame methods: as before temporal ones
    existed, so their outputs stay resumable)."""
    if spec.temporal:
        return {"retention": spec.retention, "importance": config.importance, "segment_frames": config.segment_frames,
                **HOLITOM_DEFAULTS}
    return {"budget": spec.budget, "k_neighbors": config.k_neighbors, "importance": config.importance}


def run_metadata(config: EncodeConfig, tower: TowerInfo, preprocessing: Preprocessing,
                 spec: MethodSpec | None = None) -> dict:
    """What every file of ``spec``'s output (default: the run's first method) records about how its tokens
    were made (``config`` resolved by `EncodeConfig.for_tower`)."""
    spec = spec or config.methods()[0]
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
        "method": spec.name,
        "method_params": method_params(config, spec),
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


def method_outputs(config: EncodeConfig, tower: TowerInfo, preprocessing: Preprocessing) -> list[SinkOutput]:
    """Where each method of ``config`` writes, with its metadata: the output itself for one method,
    ``OUT/<method>/`` (`MethodSpec.dirname`) for each of several."""
    specs = config.methods()
    if len(specs) == 1:
        return [SinkOutput(config.output, run_metadata(config, tower, preprocessing, specs[0]))]
    return [SinkOutput(f"{config.output.rstrip('/')}/{spec.dirname}", run_metadata(config, tower, preprocessing, spec))
            for spec in specs]


def check_layout(output: str, outputs: list[SinkOutput]) -> None:
    """Refuse to mix the two layouts in one output: one method's files at the top, or a folder per method.

    Raises:
        ValueError: several methods asked for an output holding one method's files, or one method for an
            output holding method folders (naming them).
    """
    fs, root = filesystem_and_path(output)
    if len(outputs) > 1:
        records = fs.get_file_info([f"{root}/manifest.json", f"{root}/runs"])
        if any(info.type != pafs.FileType.NotFound for info in records) or any(
                committed_files(fs, root, sub) for sub in ("index", "errors", "shards")):
            raise ValueError(f"{redact_credentials(output)} holds the output of a single method (or a run's record of "
                             "one); several methods write a folder each: use a new --output")
        return
    folders = method_folders(fs, root)
    if folders:
        raise ValueError(f"{redact_credentials(output)} holds one folder per method ({', '.join(folders)}): "
                         f"to add to one of them alone, give it as --output (e.g. {output.rstrip('/')}/{folders[0]})")


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
        reader = "this version" if existing.get("schema_version") in READABLE_VERSIONS else "that version"
        why = (f"\nIt was written by another version (schema {existing.get('schema_version')!r}; this one writes "
               f"{expected['schema_version']!r}), which this one cannot add to. Use a new --output ({reader} reads "
               "it).")
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


def pending_rows(inputs: list[InputItem], states: list[CommitState]) -> list[dict]:
    """Input rows still to process, one ``states`` entry per method's output, each row carrying the frames
    no method needs again (committed or recorded as failed in every output: not decoded) and, per method,
    those only it has (``spec_done``: JSON, a list per method, null where it needs nothing of the input;
    empty when no method has frames the others lack).

    An input is finished for a method (and not read again when it is for all) when it failed as a whole,
    or when every frame its sampling selected is in the shards or the errors (`CommitState.finished`)."""
    rows = []
    for item in inputs:
        finished = [state.finished(item.video_id) for state in states]
        if all(finished):
            continue
        open_states = [state for state, done in zip(states, finished) if not done]
        settled = [None if done else _settled(state, item.video_id) for state, done in zip(states, finished)]
        skip = set.intersection(*(frames for frames in settled if frames is not None))
        in_shards = set.intersection(*(set(state.done.get(item.video_id, ())) for state in open_states))
        only = [None if frames is None else sorted(frames - skip) for frames in settled]
        rows.append(
            {
                "video_id": item.video_id,
                "source_path": item.source_path,
                "path": item.path,
                "filesystem": item.filesystem,
                "problem": item.problem,
                "done_frames": sorted(skip & in_shards),
                "failed_frames": sorted(skip - in_shards),
                "spec_done": json.dumps(only) if any(frames != [] for frames in only) else "",
            }
        )
    return rows


def _settled(state: CommitState, video_id: str) -> set[int]:
    """Frames of ``video_id`` in ``state``'s shards or error rows."""
    return set(state.done.get(video_id, ())) | (state.failed.get(video_id) or set())


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
                # segment rows: whole segments per batch (a temporal method reduces each together)
                batch_size=max(1, config.batch_size // config.segment_size()),
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
    Then the run gets an id and takes the output's lease (one job per output; with several methods, each
    method's output's lease); its log goes to
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
    outputs = method_outputs(config, tower, preprocessing)
    try:
        check_layout(config.output, outputs)
        for target in outputs:
            check_output_compatible(target.output, target.run_metadata)
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
    lease = OutputLeases([target.output for target in outputs], run_id)  # each method's output: its own lease
    try:
        lease.acquire()
    except OutputLocked as error:
        raise OutputBusy(str(error)) from error
    except OSError as error:
        raise RunSetupError(f"cannot write to the output {redact_credentials(config.output)}: {error}") from error
    try:
        return _run_holding_lease(config, listing, preprocessing, outputs, run_id, started, lease, encoder_stage)
    finally:
        lease.release()


def _run_holding_lease(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing,
                       outputs: list[SinkOutput], run_id: str, started: float, lease: OutputLeases,
                       encoder_stage: type) -> RunSummary:
    """`run` from the moment the run has an id and holds the output: record, log, encode, record. Each
    method's output gets the run record with its own metadata; the log is the top-level output's."""
    metadata_ = outputs[0].run_metadata
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
        _write_records(outputs, run_id, record)  # also proves the outputs can be written
    except (OSError, ValueError) as error:
        run_log.close()
        raise RunSetupError(f"cannot write to the output {redact_credentials(config.output)}: {error}") from error
    with run_log:
        logger.info("run %s: %s job, output %s, log %s", run_id, config.media, redact_credentials(config.output),
                    run_log.path)
        sampling = f", sampling {metadata_['sampling']}" if config.media == "video" else ""
        methods = "; ".join(f"{t.run_metadata['method']} {t.run_metadata['method_params']}" for t in outputs)
        logger.info("model %s (%s tower, %s px, %s patches), layer %d, method %s, preprocessing %s%s", config.model,
                    metadata_["tower"], metadata_["preprocessing"]["image_size"],
                    "x".join(map(str, metadata_["patch_grid"])), config.layer, methods, preprocessing, sampling)
        errors_before: set[str] = set()
        failures_logged = False
        ray_was_running = ray.is_initialized()
        try:
            errors_before = error_files(outputs[0].output)
            _log_listing(listing)
            summary, config = _encode(config, listing, preprocessing, outputs, started, run_id, encoder_stage)
            for target in outputs:
                _merge_index(target.output, run_id)
            lease.check()
            _log_failures(outputs[0].output, errors_before)
            failures_logged = True
            for line in summary.lines():
                logger.info("%s", line)
            for path in _write_records(outputs, run_id, {
                    **record, "config": recorded_config(config), "status": "completed", "summary": asdict(summary),
                    "finished_at": utc_timestamp(time.time())}, summary):
                logger.info("run record %s", path)
        except BaseException as error:
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            run_log.settle()
            if not ray_was_running and ray.is_initialized():
                ray.shutdown()  # the Ray this run started: stop its tasks, so none commits after the list below
            if not failures_logged:
                _log_failures(outputs[0].output, errors_before)
            if not lease.lost:
                for target in outputs:
                    _merge_index(target.output, run_id)
            if interrupted:
                logger.error("run %s interrupted (%r)", run_id, error)
            elif isinstance(error, (DamagedOutputError, ResourcesUnavailable)):  # not a fault of the code: no traceback
                logger.error("run %s failed: %s", run_id, error)
            else:
                logger.exception("run %s failed: %s", run_id, type(error).__name__)
            try:
                _write_records(outputs, run_id, {
                    **record, "status": "interrupted" if interrupted else "failed", "error": brief(error),
                    "finished_at": utc_timestamp(time.time())})
            except Exception as record_error:  # noqa: BLE001 - the run's own error is the one to raise
                logger.error("cannot write the run record: %s", brief(record_error))
            if interrupted:
                raise
            raise RunFailed(run_id, run_log.path, error) from error
    return summary


def _write_records(outputs: list[SinkOutput], run_id: str, record: dict, summary: RunSummary | None = None) -> list[str]:
    """``record`` into each method's output (`write_run_record`), with that output's metadata and, with
    several methods, its own ``summary`` (the whole run's as ``run_summary``)."""
    per_method = list(summary.methods.values()) if summary is not None and summary.methods else None
    paths = []
    for i, target in enumerate(outputs):
        own = {"summary": per_method[i], "run_summary": record["summary"]} if per_method else {}
        paths.append(write_run_record(target.output, run_id, {**record, "run_metadata": target.run_metadata, **own}))
    return paths


def _merge_index(output: str, run_id: str) -> None:
    """Merge this run's index parts into one file (best effort: unmerged parts are read as well)."""
    try:
        merged = merge_index_parts(*filesystem_and_path(output), run_id)
        logger.debug("merged %d index parts into index/run-%s.parquet", merged, run_id)
    except (OSError, ValueError) as error:
        logger.warning("cannot merge the index parts of %s (readers read them unmerged): %s", output, brief(error))


def _encode(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing, outputs: list[SinkOutput],
            started: float, run_id: str, encoder_stage: type) -> tuple[RunSummary, EncodeConfig]:
    """Make each method's output consistent (`prepare_output`), plan against what earlier runs committed
    to each, run the graph, and summarise.

    Returns the summary and the config with the encoder device that was chosen filled in."""
    states = []
    for target in outputs:
        prepared = prepare_output(target.output, target.run_metadata, config.set_aside_damaged)
        where = f" of {redact_credentials(target.output)}" if len(outputs) > 1 else ""
        if prepared.temporaries_removed:
            logger.info("removed %d temporary files%s left by an interrupted run", prepared.temporaries_removed, where)
        if prepared.adopted:
            logger.info("committed %d shard(s)%s an interrupted run wrote but did not index", len(prepared.adopted),
                        where)
        for path in prepared.set_aside:
            logger.warning("set aside damaged %s", path)
        states.append(prepared.state)
    inputs = listing.items
    rows = pending_rows(inputs, states)
    _log_plan(inputs, rows, states[0].failed, config.media)

    # the most tokens one row holds, over every method: sizes the write tasks
    views = 1 + max(w * h for w, h in config.pinpoint_list()) // preprocessing.image_size**2 if config.anyres else 1
    patches = outputs[0].run_metadata["patch_grid"][0] * outputs[0].run_metadata["patch_grid"][1]
    most = max(config.segment_frames * patches if spec.temporal else views * ((spec.budget or patches) + 1)
               for spec in config.methods())
    sink = ShardSink(outputs, run_id, config.frames_per_shard, int(config.shard_mb * 2**20), most)
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
    methods = [spec.text for spec in config.methods()]
    return summarize_run(listing, rows, states, sink.stats, methods, time.time() - started), config


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


def summarize_run(listing: Listing, rows: list[dict], states: list[CommitState], stats: list[WriteStats],
                  methods: list[str], wall_s: float) -> RunSummary:
    """Count each input once, by what the outputs hold for it now (earlier runs' commits included): an
    input counts as encoded, failed or skipped by what any method's output holds. Frames: the most any
    method encoded; rows, tokens, bytes and error rows: all methods' together. With several methods,
    ``methods`` holds each one's own summary (its output alone, as a run of it alone would count it)."""
    summary = _summary(listing, rows, states, stats, wall_s)
    if len(methods) > 1:
        summary.methods = {method: asdict(_summary(listing, rows, [state], [part], wall_s, log_missing=False))
                           for method, state, part in zip(methods, states, stats)}
    return summary


def _summary(listing: Listing, rows: list[dict], states: list[CommitState], stats: list[WriteStats], wall_s: float,
             log_missing: bool = True) -> RunSummary:
    inputs = listing.items
    touched = set().union(*(s.encoded_videos | s.failed_videos for s in stats))
    with_tokens = set().union(*(set(state.frames) | s.encoded_videos for state, s in zip(states, stats)))
    with_errors = set().union(*(set(state.failed) | s.failed_videos for state, s in zip(states, stats)))
    failed_before = set().union(*(set(state.failed) for state in states))
    seen_before = {item.video_id for item in inputs} & set().union(
        *(set(state.frames) | set(state.failed) for state in states))
    accounted = touched | seen_before
    missing = [row for row in rows if row["video_id"] not in accounted]
    for row in missing if log_missing else ():
        logger.error("%s ended in neither shards nor errors (no frame was sampled or decoded)", row["source_path"])
    frames = max(s.frames for s in stats)
    rows_written = sum(s.rows for s in stats)
    return RunSummary(
        inputs=len(inputs),
        duplicates=len(listing.duplicates),
        listing_notes=len(listing.notes),
        skipped=len(seen_before - touched),
        skipped_failed=len((seen_before - touched) & failed_before),
        encoded=len(touched - with_errors),
        partly_failed=len(touched & with_tokens & with_errors),
        failed=len(touched & with_errors - with_tokens),
        missing=len(missing),
        frames=frames,
        rows=rows_written,
        error_rows=sum(s.error_rows for s in stats),
        mean_tokens_per_row=sum(s.tokens for s in stats) / rows_written if rows_written else 0.0,
        frames_per_s=frames / wall_s if wall_s else 0.0,
        bytes_written=sum(s.bytes for s in stats),
        wall_s=wall_s,
    )
