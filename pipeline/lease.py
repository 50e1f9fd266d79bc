"""One writer per output: a numbered lease, created only where none of its number exists, and a fence
that every write checks.

A job takes an output by creating ``OUT/lease/<generation>.json`` (run id, host, pid, start time) with
the next generation number: the lease of the highest number is the holder. On a local disk the file is
created with ``O_CREAT | O_EXCL``, so of two jobs that start at the same moment exactly one gets the
number and the other refuses. An object store offers no exclusive create through pyarrow: there the
job reads its lease back after writing it, and every later fence check reads it again, so of two jobs
that wrote the same number the one whose record is not there stops.

* **Live or not.** The holder is live while its file's time is within ``ttl_s`` (the heartbeat renews it
  every ``heartbeat_s``), unless it says it was released or names a process of this host that no longer
  exists (a job killed here is taken over at once). A job refuses an output whose holder is live
  (`OutputLocked`); else it takes the next number. Staleness by age compares the store's file times with
  this machine's clock: keep clocks in sync (NTP) across hosts.
* **Never re-created.** The heartbeat renews the holder's own file in place (a local ``utime``; an
  object store: a rewrite after a fence check): it never brings back a lease another job has taken over,
  because a takeover creates a higher number, and a lower one never again holds the output.
* **The fence.** `Fence.check` (picklable; write tasks carry it in their `pipeline.store.Store`) lists
  the lease folder: unless the highest number is its own and its file still names the run (a number is used
  again after lease files were deleted by hand), the run has lost the output (`LeaseLost`). The heartbeat
  and the release check the fence first, so a job never renews or releases another job's lease.
* **Release.** A job that ends marks its file released (it stays as the highest number until the next
  job takes the next one), so a stalled earlier holder can never come back as the highest.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.inputs import filesystem_and_path, is_local, redact_credentials
from pipeline.runlog import location
from pipeline.store import publish, sync_folder

LEASE_DIR = "lease"
TTL_S = 60.0
HEARTBEAT_S = 10.0
_NAME = re.compile(r"^(\d{10})\.json$")

logger = logging.getLogger(__name__)


class OutputLocked(Exception):
    """Another job holds the output's lease."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over by another job (its heartbeat was older than the TTL)."""


@dataclass(frozen=True)
class Holder:
    """A lease file: its number, who wrote it, and how many seconds ago it was last renewed."""

    path: str
    generation: int
    run_id: str | None  # None: its record could not be read
    host: str
    pid: int
    started_at: str
    released: bool
    age_s: float

    def describe(self) -> str:
        heartbeat = (f"heartbeat {self.age_s:.0f} s ago" if self.age_s >= -1 else
                     f"heartbeat {-self.age_s:.0f} s in the future: is that clock ahead of this one?")
        return f"run {self.run_id or '?'} (host {self.host}, pid {self.pid}, started {self.started_at}, {heartbeat})"


@functools.lru_cache(maxsize=64)
def _filesystem(output: str) -> tuple[pafs.FileSystem, str]:
    """`filesystem_and_path` of ``output``, made once per process (an object store's may look up its region)."""
    return filesystem_and_path(output)


def lease_path(root: str, generation: int) -> str:
    return f"{root}/{LEASE_DIR}/{generation:010d}.json"


def holders(fs: pafs.FileSystem, root: str) -> list[Holder]:
    """The lease files of the output at ``root``, lowest number first."""
    now = time.time()
    found = []
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{LEASE_DIR}", allow_not_found=True)):
        match = _NAME.match(info.base_name)
        if info.type != pafs.FileType.File or not match:
            continue
        try:
            with fs.open_input_stream(info.path) as stream:
                record = json.loads(stream.read())
        except (OSError, ValueError):
            record = {}  # removed meanwhile, or damaged: judged by its age alone
        age = now - info.mtime.timestamp() if info.mtime else 0.0
        found.append(Holder(info.path, int(match.group(1)), record.get("run_id"),
                            str(record.get("host", "?")), int(record.get("pid", -1)),
                            str(record.get("started_at", "?")), bool(record.get("released", False)), age))
    return sorted(found, key=lambda holder: holder.generation)


@dataclass(frozen=True)
class Fence:
    """What a writer checks before each write: that lease ``generation`` of ``output`` is still the highest
    (and, on an object store, still holds ``run_id``'s record). Picklable."""

    output: str
    generation: int
    run_id: str

    def check(self) -> None:
        """Raise `LeaseLost` unless this run still holds the output: the highest lease number is its own and
        its file still names this run (a number is used again when lease files were deleted by hand).

        Raises:
            LeaseLost: another job holds the output.
            OSError: the lease file of this run's number cannot be read now (transient, or damaged).
        """
        fs, root = _filesystem(self.output)
        found = holders(fs, root)
        top = found[-1] if found else None
        if top is not None and top.generation == self.generation and top.run_id is None:
            raise OSError(f"cannot read the lease {top.path} (a read that failed, or a damaged file)")
        if top is None or top.generation != self.generation or top.run_id != self.run_id:
            raise LeaseLost(f"run {self.run_id} no longer holds {redact_credentials(self.output)}: another job took "
                            "its lease over; nothing more is written by this run")


class OutputLease:
    """Context manager: holds ``output``'s lease for ``run_id`` while open (see the module).

    Raises:
        OutputLocked: (entering) another live job holds the output.
        OSError: the lease file cannot be written.
    """

    def __init__(self, output: str, run_id: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.output = output
        self.shown = redact_credentials(output)  # as messages show it
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.fs, self.root = filesystem_and_path(output)
        self.fence: Fence | None = None
        self.taken_over: list[Holder] = []  # stale leases this job's number replaced
        self.lost = False  # set by the heartbeat once another job holds the output
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def path(self) -> str:
        return lease_path(self.root, self.fence.generation)

    def acquire(self) -> None:
        """Take the next lease number unless a live job holds the output (see the module)."""
        self.fs.create_dir(f"{self.root}/{LEASE_DIR}", recursive=True)
        found = holders(self.fs, self.root)
        top = found[-1] if found else None
        if top is not None and not top.released and not self._is_stale(top):
            raise self._locked(top)
        generation = (top.generation if top else 0) + 1
        if not self._create(generation):
            newer = holders(self.fs, self.root)
            raise self._locked(newer[-1]) if newer else OutputLocked(f"{self.shown}: another job took the lease")
        self.fence = Fence(self.output, generation, self.run_id)
        if top is not None and not top.released:
            self.taken_over.append(top)
            logger.warning("took over the lease of %s: stale", top.describe())
        for old in found:  # lower numbers never hold the output again
            try:
                self.fs.delete_file(old.path)
            except OSError:
                pass
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _create(self, generation: int) -> bool:
        """Create lease ``generation`` with this job's record; False when another job created it first."""
        path = lease_path(self.root, generation)
        data = json.dumps(self._record).encode()
        if is_local(self.fs):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(descriptor, data)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            sync_folder(os.path.dirname(path))
            return True
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        publish(self.fs, path, data)
        try:
            with self.fs.open_input_stream(path) as stream:  # another job may have written the same number
                return json.loads(stream.read()).get("run_id") == self.run_id
        except (OSError, ValueError):
            return False

    def _locked(self, holder: Holder) -> OutputLocked:
        return OutputLocked(
            f"{self.shown} is being written by another job: {holder.describe()}. One job writes an output "
            f"at a time. If that job is dead, its lease is taken over once its heartbeat is {self.ttl_s:.0f} s "
            f"old (or at once on its own host); to take it over now, delete "
            f"{location(self.output, posixpath.relpath(holder.path, self.root))}.")

    def _is_stale(self, holder: Holder) -> bool:
        if holder.age_s > self.ttl_s:
            return True
        return holder.host == socket.gethostname() and holder.pid > 0 and not _process_exists(holder.pid)

    def _renew(self, released: bool = False) -> None:
        """Renew this job's lease file in place (never re-create it); raises `LeaseLost` once it lost it."""
        self.fence.check()
        if released or not is_local(self.fs):
            publish(self.fs, self.path, json.dumps({**self._record, "released": released}).encode())
            return
        try:
            os.utime(self.path)
        except FileNotFoundError:
            raise LeaseLost(f"run {self.run_id}: its lease file {self.path} is gone") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except LeaseLost as error:
                self.lost = True
                logger.error("%s", error)
                return
            except OSError as error:  # a transient failure; the next beat tries again
                logger.warning("lease heartbeat failed: %s", error)

    def check(self) -> None:
        """Raise `LeaseLost` if another job took the lease over."""
        if self.lost:
            raise LeaseLost(f"run {self.run_id} lost the lease of {self.shown} to another job")
        self.fence.check()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless another job has taken it over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.fence is None or self.lost:
            return
        try:
            self._renew(released=True)
        except (LeaseLost, OSError) as error:
            logger.warning("could not release the lease of %s: %s", self.shown, error)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class OutputLeases:
    """The leases of several outputs held together (a run's ``--output`` and, with several methods, each
    method's folder): all are taken, or none (`OutputLocked` from the first held by another job, after
    releasing those taken)."""

    def __init__(self, outputs: list[str], run_id: str) -> None:
        self.leases = [OutputLease(output, run_id) for output in outputs]

    def acquire(self) -> None:
        taken = []
        try:
            for lease in self.leases:
                lease.acquire()
                taken.append(lease)
        except BaseException:
            for lease in taken:
                lease.release()
            raise

    def fence(self, output: str) -> Fence:
        """The fence of ``output``'s lease."""
        return next(lease.fence for lease in self.leases if lease.output == output)

    @property
    def lost(self) -> bool:
        return any(lease.lost for lease in self.leases)

    def check(self) -> None:
        """Raise `LeaseLost` if another job took any of the leases over."""
        for lease in self.leases:
            lease.check()

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
