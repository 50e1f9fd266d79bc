"""A run's identity and records: its id, its log file ``OUT/logs/<run-id>.log``, and its record
``OUT/runs/<run-id>.json``, of which ``OUT/manifest.json`` is a copy of the newest.

The job logs with the standard `logging` module under the project's logger names (``pipeline.*``,
``operators.*``). While a `RunLog` is open those records go to the run's log file, and so does every
line of output Ray forwards from the job's workers (decoder messages, tracebacks of failed tasks), which
Ray itself prints only to the driver's console.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import platform
import re
import secrets
import tempfile
import time
from importlib import metadata

import pyarrow.fs as pafs

from pipeline.inputs import filesystem_and_path, is_local, redact_credentials
from pipeline.store import Store

PROJECT_LOGGERS = ("pipeline", "operators")
WORKER_LOGGER = "pipeline.workers"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SETTLE_S = 1.0  # how long a stopping run waits for the workers' last output (see `RunLog.settle`)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UTC = "%Y-%m-%dT%H:%M:%SZ"
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PACKAGES = ("torch", "transformers", "ray", "pyarrow", "einops", "av", "pillow", "numpy")

logger = logging.getLogger(__name__)


def new_run_id(seconds: float | None = None) -> str:
    """``YYYYMMDDTHHMMSS.mmmZ-xxxxxx``: the UTC start time to the millisecond and 6 random hex digits, so
    ids sort by start time and two runs started in the same millisecond still differ."""
    return f"{_id_stamp(time.time() if seconds is None else seconds)}-{secrets.token_hex(3)}"


def _id_stamp(seconds: float) -> str:
    """``YYYYMMDDTHHMMSS.mmmZ``: the time part of a run id."""
    milliseconds = int(seconds * 1000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(milliseconds // 1000))}.{milliseconds % 1000:03d}Z"


def utc_timestamp(seconds: float) -> str:
    """``seconds`` since the epoch as ``2026-11-29T07:15:30Z``."""
    return time.strftime(_UTC, time.gmtime(seconds))


def plain_text(text: str) -> str:
    """``text`` as a file should keep it: terminal colour codes removed, and each line that a progress
    bar redrew with carriage returns reduced to its last state."""
    lines = _TERMINAL_CODES.sub("", text).split("\n")
    return "\n".join(line.rstrip("\r").rpartition("\r")[2] for line in lines)


class _Formatter(logging.Formatter):
    """``2026-11-29T07:15:30Z INFO pipeline.run: message`` (UTC). For a file (``plain=True``) terminal
    colour codes are removed and a progress bar's line keeps only its last state (the text after its
    last carriage return)."""

    converter = time.gmtime

    def __init__(self, plain: bool) -> None:
        super().__init__(_FORMAT, datefmt=_UTC)
        self.plain = plain

    def format(self, record: logging.LogRecord) -> str:
        if not self.plain:
            return super().format(record)
        text = super().format(logging.makeLogRecord({**record.__dict__, "msg": plain_text(record.getMessage()),
                                                     "args": None}))
        return _TERMINAL_CODES.sub("", text)  # a traceback can carry them too


def set_project_level(level: str) -> None:
    """Let the project's records at ``level`` and above through (other libraries keep their levels)."""
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def location(output: str, relative: str) -> str:
    """Where ``relative`` lies under the output, as a user names it: an absolute path, or a URI (with
    its ``?options`` kept after the path, and credentials shown as ``***``)."""
    if "://" in output:
        base, mark, options = output.partition("?")
        return redact_credentials(f"{base.rstrip('/')}/{relative}{mark}{options}")
    return os.path.join(os.path.abspath(output), relative)


def configure_console(level: str) -> None:
    """The command line's console: the project's records at ``level`` on stderr (warnings of other
    libraries too, as Python shows them by default)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(plain=False))
    handler.setLevel(level)
    logging.getLogger().addHandler(handler)
    set_project_level(level)


class RunLog:
    """Context manager: while open, the project's log records and Ray's worker output go to the run's log file.

    The file keeps INFO and above whatever ``level`` the console shows (DEBUG too when ``level`` is
    DEBUG), so every run's log holds its plan, failures and summary. A local output gets
    ``OUT/logs/<run-id>.log`` written as the run goes (``tail -f`` works); for an object-store output
    the log is written to a local temporary file and uploaded when the run ends. Ray's worker output
    reaches the driver only when Ray was started with ``log_to_driver=True`` (the default; the job
    starts it so); Ray's own notices about workers it lost reach the console only.

    Raises:
        ValueError: ``level`` is not one of `LEVELS`.
        OSError: the log directory cannot be created (entering).
    """

    def __init__(self, output: str, run_id: str, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
        self.run_id = run_id
        self.level = "DEBUG" if level == "DEBUG" else "INFO"
        self._fs, root = filesystem_and_path(output)
        self._target = f"{root}/logs/{run_id}.log"  # the log's path on the output's filesystem
        self.path = location(output, f"logs/{run_id}.log")  # the same, as a user names it
        self._local = is_local(self._fs)
        self._handler: logging.FileHandler | None = None
        self._forwarding = f"video-token-cache-{run_id}"
        self._forwarding_active = False

    def __enter__(self) -> "RunLog":
        if self._handler is None:
            self.open()
        return self

    def open(self) -> None:
        """Create the log file and start copying records into it (`__enter__` does this if not done yet).

        Raises:
            OSError: the log directory or file cannot be created.
        """
        if self._local:
            os.makedirs(os.path.dirname(self._target), exist_ok=True)
            target = self._target
        else:
            handle, target = tempfile.mkstemp(prefix=f"{self.run_id}-", suffix=".log")
            os.close(handle)
        self._handler = logging.FileHandler(target, encoding="utf-8")
        self._handler.setFormatter(_Formatter(plain=True))
        self._handler.setLevel(self.level)
        logging.getLogger().addHandler(self._handler)
        for name in PROJECT_LOGGERS:  # let INFO through to the file even if the console shows less
            project = logging.getLogger(name)
            if project.getEffectiveLevel() > logging.getLevelName(self.level):
                project.setLevel(self.level)

        workers = logging.getLogger(WORKER_LOGGER)
        workers.propagate = False  # Ray already prints these lines on the console
        workers.addHandler(self._handler)
        self._start_forwarding(workers)

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()

    def settle(self) -> None:
        """Give Ray a moment to deliver the workers' last output (a failing worker's traceback), which it
        streams with a lag of a fraction of a second; call it before stopping Ray on an error."""
        if self._forwarding_active:
            time.sleep(SETTLE_S)

    def close(self) -> None:
        """Stop copying records, close the file and, for an object-store output, upload it."""
        if self._handler is None:
            return  # never opened, or opening failed
        self._stop_forwarding()
        handler, self._handler = self._handler, None
        logging.getLogger().removeHandler(handler)
        logging.getLogger(WORKER_LOGGER).removeHandler(handler)
        handler.close()
        if not self._local:
            self._fs.create_dir(os.path.dirname(self._target), recursive=True)
            with open(handler.baseFilename, "rb") as source, self._fs.open_output_stream(self._target) as target:
                target.write(source.read())
            os.unlink(handler.baseFilename)

    def _start_forwarding(self, workers: logging.Logger) -> None:
        """Copy the worker output Ray streams to this driver into ``workers``, at INFO: it is raw material
        (decoder chatter, progress bars, tracebacks); the job's own records say what went wrong."""
        try:
            # Ray has no public hook for this stream; its driver console printer subscribes the same way.
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
            from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
        except ImportError:
            logger.warning("this Ray version offers no worker output stream: worker messages reach the console "
                           "only, not %s", self.path)
            return

        def forward(data: dict) -> None:
            if data.get("pid") == "autoscaler":
                return  # the autoscaler's periodic status report; Ray's console hides it too
            source = data.get("actor_name") or data.get("task_name") or "worker"
            for line in data.get("lines", ()):
                if RAY_TQDM_MAGIC not in line:  # progress-bar state, not text
                    workers.info("(%s pid=%s) %s", source, data.get("pid"), plain_text(line))

        dispatcher.add_handler(self._forwarding, forward)
        self._forwarding_active = True

    def _stop_forwarding(self) -> None:
        if self._forwarding_active:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            dispatcher.remove_handler(self._forwarding)
            self._forwarding_active = False


def write_run_record(store: Store, run_id: str, record: dict) -> str:
    """Write ``record`` as ``OUT/runs/<run-id>.json`` and copy it to ``OUT/manifest.json`` (the newest run),
    through the output's fenced ``store``.

    Each file is published whole (`pipeline.store.publish`), so a reader never sees half of one. A
    ``manifest.json`` from before runs were recorded (one without a ``run_id``, or not readable
    as a record) is first kept as ``runs/<its finished_at as a run id>-legacy.json``, which sorts among
    the run records by time. Returns where the record is, as a user names it.

    Raises:
        OSError: the output cannot be written.
        pipeline.lease.LeaseLost: another job took the output over.
    """
    fs = store.fs
    store.make_folders("runs")
    info = fs.get_file_info(store.path("manifest.json"))
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(store.path("manifest.json")) as stream:
            previous = stream.read()
        try:
            finished = json.loads(previous)
        except ValueError:
            finished = None
        if not isinstance(finished, dict) or "run_id" not in finished:
            when = _parse_utc(finished.get("finished_at")) if isinstance(finished, dict) else None
            when = when if when is not None else (info.mtime.timestamp() if info.mtime else 0.0)
            store.publish(f"runs/{_id_stamp(when)}-legacy.json", previous)
    data = json.dumps(record, indent=2, default=str).encode()
    store.publish(f"runs/{run_id}.json", data)
    store.publish("manifest.json", data)
    return location(store.output, f"runs/{run_id}.json")


def recorded_config(config) -> dict:
    """An `pipeline.config.EncodeConfig` as the run record keeps it: credentials in URIs (``s3://KEY:SECRET@...``)
    replaced by ``***``."""
    return {name: redact_credentials(value) if isinstance(value, str) else value
            for name, value in config.to_dict().items()}


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages the run's tokens depend on, as its record keeps them."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _parse_utc(text) -> float | None:
    """Seconds since the epoch of a ``2026-11-29T07:15:30Z`` timestamp, or None."""
    try:
        return calendar.timegm(time.strptime(text, _UTC))
    except (TypeError, ValueError):
        return None
