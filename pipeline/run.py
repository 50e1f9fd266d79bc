"""One run, from its `EncodeConfig` to its summary: the checks that need no Ray, the leases, the run's record
and log, then the graph (`pipeline.graph`), the reconciliation (`pipeline.summary`) and the record again."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import asdict

import ray

from operators.checkpoint import resolve_revision
from operators.preprocess import Preprocessing
from operators.towers import describe_tower
from pipeline.config import EncodeConfig
from pipeline.encoder import EncodeTokens
from pipeline.graph import build_dataset
from pipeline.index import merge_index_parts
from pipeline.inputs import Listing, list_inputs, redact_credentials
from pipeline.lease import OutputLeases, OutputLocked
from pipeline.outputs import MethodOutput, check_outputs, method_outputs
from pipeline.plan import input_rows
from pipeline.repair import prepare_output
from pipeline.report import failure_line
from pipeline.resources import ResourcesUnavailable, plan_resources
from pipeline.runlog import (RunLog, new_run_id, package_versions, plain_text, recorded_config, utc_timestamp,
                             write_run_record)
from pipeline.schema import ERROR_SCHEMA, SCHEMA_VERSION
from pipeline.sink import ShardSink
from pipeline.state import OutputState, read_state
from pipeline.store import DamagedOutputError, committed_files, read_parquet_files
from pipeline.summary import RunSummary, reconcile, summarize_run

logger = logging.getLogger(__name__)


class RunSetupError(Exception):
    """The run could not start: the settings do not fit the model, the input is missing, unreadable or
    holds no media, the output cannot be written, or it holds shards made with other settings. No work
    was done and nothing was written (but, where the output is only partly writable, an empty log file,
    and where the settings clash was found under the lease, the released lease)."""


class OutputBusy(RunSetupError):
    """Another job holds the output's lease (`pipeline.lease`); nothing was written."""


class RunFailed(RuntimeError):
    """The run started (it has an id, a log and a record) and then failed; ``__cause__`` says why."""

    def __init__(self, run_id: str, log: str, cause: BaseException) -> None:
        super().__init__(f"run {run_id} failed: {brief(cause)} (traceback in {log})")
        self.run_id = run_id
        self.log = log


class FramesUnaccounted(RuntimeError):
    """Planned frames ended in neither shards nor error rows (`pipeline.summary.reconcile`): a fault."""

    def __init__(self, lines: list[str]) -> None:
        listed = "".join(f"\n  {line}" for line in lines[:20])
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        super().__init__(f"{len(lines)} planned (input, method) pairs ended in neither shards nor error rows:"
                         f"{listed}{more}")
        self.lines = lines


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
    """Encode every input of ``config`` into ``config.output``; what earlier runs settled is not done again.

    Checks that need no Ray (the model's config, the output's layout and settings, the input listing) run
    first. Then the run gets an id and takes the leases (`pipeline.lease`) of ``--output`` and, with several
    methods, of each method's folder, and checks the output's layout and settings again under them. Its log
    goes to ``OUT/logs/<run-id>.log`` and its record (config, versions, summary, status) to each method's
    ``runs/<run-id>.json`` and ``manifest.json``: written at the start with status ``running``, and again
    when the run completes, fails or is interrupted. Every error row the run commits is logged with its
    reason, also when it stops early. At the end every planned frame is reconciled (`pipeline.summary`).

    Raises:
        ModelUnavailableError: the model's config cannot be loaded.
        OutputBusy: another job holds the output (its lease); nothing was written.
        RunSetupError: the run could not start (see there).
        RunFailed: the run failed after it started; its record says ``failed``. Its ``__cause__`` is a
            `pipeline.store.DamagedOutputError` when committed files of the output are damaged, a
            `pipeline.resources.ResourcesUnavailable` when the cluster cannot hold the actors asked for
            (or no GPU came for ``--device cuda``), `FramesUnaccounted` when planned frames ended nowhere.
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
        check_outputs(config.output, outputs)
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
    # The output's own lease, and with several methods each folder's: a job on the output and a job on one of
    # its folders exclude each other, whichever layout either writes.
    leases = OutputLeases([config.output, *(target.output for target in outputs if target.output != config.output)],
                          run_id)
    try:
        leases.acquire()
    except OutputLocked as error:
        raise OutputBusy(str(error)) from error
    except OSError as error:
        raise RunSetupError(f"cannot write to the output {redact_credentials(config.output)}: {error}") from error
    try:
        try:
            check_outputs(config.output, outputs)  # again: a job that held the output until now may have written
        except (OSError, ValueError) as error:
            raise RunSetupError(str(error)) from error
        outputs = [dataclasses.replace(target, fence=leases.fence(target.output)) for target in outputs]
        return _run_holding_lease(config, listing, preprocessing, outputs, run_id, started, leases, encoder_stage)
    finally:
        leases.release()


def _run_holding_lease(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing,
                       outputs: list[MethodOutput], run_id: str, started: float, leases: OutputLeases,
                       encoder_stage: type) -> RunSummary:
    """`run` from the moment the run has an id and holds the output: record, log, encode, reconcile, record.
    Each method's output gets the run record with its own metadata; the log is the top-level output's."""
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
        specs = [spec.text for spec in config.methods()]
        errors_before = [set(_error_files(target)) for target in outputs]
        failures_logged = False
        ray_was_running = ray.is_initialized()
        try:
            _log_listing(listing)
            summary, config = _encode(config, listing, preprocessing, outputs, started, encoder_stage)
            for target in outputs:
                _merge_index(target, run_id)
            leases.check()
            _log_failures(outputs, specs, errors_before)
            failures_logged = True
            for line in summary.lines():
                logger.info("%s", line)
            if summary.unaccounted:
                raise FramesUnaccounted(summary.unaccounted)
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
                _log_failures(outputs, specs, errors_before)
            if not leases.lost:
                for target in outputs:
                    _merge_index(target, run_id)
            if interrupted:
                logger.error("run %s interrupted (%r)", run_id, error)
            elif isinstance(error, (DamagedOutputError, ResourcesUnavailable, FramesUnaccounted)):  # said in full
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


def _write_records(outputs: list[MethodOutput], run_id: str, record: dict,
                   summary: RunSummary | None = None) -> list[str]:
    """``record`` into each method's output (`write_run_record`), with that output's metadata and, with
    several methods, its own ``summary`` (the whole run's as ``run_summary``)."""
    per_method = list(summary.methods.values()) if summary is not None and summary.methods else None
    paths = []
    for i, target in enumerate(outputs):
        own = {"summary": per_method[i], "run_summary": record["summary"]} if per_method else {}
        paths.append(write_run_record(target.store(), run_id, {**record, "run_metadata": target.run_metadata, **own}))
    return paths


def _merge_index(target: MethodOutput, run_id: str) -> None:
    """Merge this run's index parts into one file (best effort: unmerged parts are read as well)."""
    try:
        merged = merge_index_parts(target.store(), run_id)
        logger.debug("merged %d index parts into index/run-%s.parquet", merged, run_id)
    except (OSError, ValueError, RuntimeError) as error:
        logger.warning("cannot merge the index parts of %s (readers read them unmerged): %s",
                       redact_credentials(target.output), brief(error))


def _encode(config: EncodeConfig, listing: Listing, preprocessing: Preprocessing, outputs: list[MethodOutput],
            started: float, encoder_stage: type) -> tuple[RunSummary, EncodeConfig]:
    """Make each method's output consistent (`prepare_output`), plan against what each holds, run the graph,
    reconcile and summarise.

    Returns the summary and the config with the encoder device that was chosen filled in."""
    states = []
    for target in outputs:
        prepared = prepare_output(target.store(), target.run_metadata, config.set_aside_damaged)
        where = f" of {redact_credentials(target.output)}" if len(outputs) > 1 else ""
        if prepared.temporaries_removed:
            logger.info("removed %d temporary files%s left by an interrupted run", prepared.temporaries_removed, where)
        if prepared.adopted:
            logger.info("committed %d shard(s)%s no index file named (an interrupted run's, or those a damaged index "
                        "file set aside named)", len(prepared.adopted), where)
        for path in prepared.set_aside:
            logger.warning("set aside damaged %s", path)
        states.append(prepared.state)
    rows = input_rows(listing.items, states, config.segment_size())
    _log_plan(listing, rows, states)

    # the most tokens one unit holds, over every method: sizes the write tasks
    views = 1 + max(w * h for w, h in config.pinpoint_list()) // preprocessing.image_size**2 if config.anyres else 1
    patches = outputs[0].run_metadata["patch_grid"][0] * outputs[0].run_metadata["patch_grid"][1]
    most = max(config.segment_frames * patches if spec.temporal else views * ((spec.budget or patches) + 1)
               for spec in config.methods())
    sink = ShardSink(outputs, config.frames_per_shard, int(config.shard_mb * 2**20), most)
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
    after = [read_state(target.store().fs, target.store().root) for target in outputs]
    methods = [spec.text for spec in config.methods()]
    unaccounted = reconcile(rows, sink.plans, after, methods)
    return summarize_run(listing, rows, after, sink.stats, methods, unaccounted, time.time() - started), config


def _ensure_ray(config: EncodeConfig) -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) or --ray-address joins a cluster; otherwise Ray starts locally,
        # under a watchdog that ends its processes if this one dies, even by SIGKILL (pipeline/embedded_ray.py).
        # Workers' output (tracebacks, decoder messages) is streamed to this driver and its run log.
        from pipeline.embedded_ray import init_ray

        # "local": a new Ray even when /tmp/ray names a cluster started by `ray start` (maybe long dead),
        # which a bare ray.init() would try to join.
        init_ray(address=config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def _log_listing(listing: Listing) -> None:
    for name, source_path in listing.duplicates:
        logger.warning("listed again: %s names the input %s (encoded once)", name, source_path)
    for note in listing.notes:
        logger.warning("skipped while listing: %s", note)


def _log_plan(listing: Listing, rows: list[dict], states: list[OutputState]) -> None:
    for item in listing.items:
        logger.debug("input %s: %s", item.video_id, item.source_path)
    resumed = [row for row in rows if row["recorded_sampled"] >= 0 or any(row["settled"])]
    retried = [row for row in rows if any(state.errors[row["video_id"]].retryable
                                          or state.errors[row["video_id"]].whole == "retryable"
                                          for state in states if row["video_id"] in state.errors)]
    logger.info("inputs: %d found, %d to read (%d with frames from earlier runs: only frames no method has are "
                "decoded; %d tried again after failures a retry may pass)", len(listing.items), len(rows),
                len(resumed), len(retried))
    for row in resumed:
        logger.debug("resuming %s: try %d, settled per method %s", row["source_path"], row["attempt"],
                     [len(frames) for frames in row["settled"]])
    read = {row["video_id"] for row in rows}
    failed = sum(1 for item in listing.items
                 if item.video_id not in read and any(item.video_id in state.errors for state in states))
    if failed:
        logger.info("inputs skipped with failures for good from earlier runs: %d (not tried again: encode them into a "
                    "new --output to try them)", failed)


def _error_files(target: MethodOutput) -> list[str]:
    store = target.store()
    return committed_files(store.fs, store.root, "errors")


def _log_failures(outputs: list[MethodOutput], specs: list[str], before: list[set[str]]) -> None:
    """Log each error row committed since ``before`` (per method, the error files that existed then)."""
    for target, spec, known in zip(outputs, specs, before):
        try:
            store = target.store()
            files = sorted(set(_error_files(target)) - known)
            rows = read_parquet_files(store.fs, files, ERROR_SCHEMA, target.output).to_pylist() if files else []
        except Exception as error:  # noqa: BLE001 - a report, not the run's work: never mask the run's outcome
            logger.warning("cannot read this run's error rows back from %s: %s", redact_credentials(target.output),
                           brief(error))
            continue
        label = f"{spec}: " if len(outputs) > 1 else ""
        for row in sorted(rows, key=lambda row: (row["source_path"], row["frame_indices"])):
            logger.warning("failed: %s%s", label, failure_line(row))
