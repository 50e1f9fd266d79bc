"""One writer per output: a lease file naming the job that holds the output, kept fresh by a heartbeat.

A job writes ``OUT/lease/<run-id>.json`` (run id, host, pid, start time), then lists ``OUT/lease/``. A
lease of another job is *live* while its file was rewritten within ``ttl_s`` (the heartbeat rewrites
it every ``heartbeat_s``), unless it names a process of this host that no longer exists (a job killed
here is taken over at once). Any live lease but its own → the job deletes its file and refuses
(`OutputLocked`); stale leases are deleted (taken over). Two jobs that start at the same moment both
see each other and both refuse; they never both proceed. This needs only whole-file writes, listing,
and deletes that are immediately visible, which local disks and S3 (strongly consistent since 2020)
provide; no rename and no conditional write.

Writes are fenced: before a write task commits a shard (`pipeline.commit.commit_shard`) it checks that
its job's lease file still exists (`check_held`), so a job whose lease was taken over (a driver that
stalled past ``ttl_s``) stops committing instead of writing beside the new holder. Staleness by age
compares the store's file times with this machine's clock: keep clocks in sync (NTP) across hosts.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.commit import publish
from pipeline.inputs import filesystem_and_path, redact_credentials
from pipeline.runlog import location

LEASE_DIR = "lease"
TTL_S = 60.0
HEARTBEAT_S = 10.0

logger = logging.getLogger(__name__)


class OutputLocked(Exception):
    """Another job holds the output's lease."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over by another job (its heartbeat was older than the TTL)."""


@dataclass(frozen=True)
class Holder:
    """A lease file: who wrote it, and how many seconds ago it was last rewritten."""

    path: str
    run_id: str
    host: str
    pid: int
    started_at: str
    age_s: float

    def describe(self) -> str:
        heartbeat = (f"heartbeat {self.age_s:.0f} s ago" if self.age_s >= -1 else
                     f"heartbeat {-self.age_s:.0f} s in the future: is that clock ahead of this one?")
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started_at}, {heartbeat})"


def lease_path(root: str, run_id: str) -> str:
    return f"{root}/{LEASE_DIR}/{run_id}.json"


def check_held(fs: pafs.FileSystem, root: str, run_id: str) -> None:
    """Raise `LeaseLost` unless the lease file of ``run_id`` still exists."""
    if fs.get_file_info(lease_path(root, run_id)).type != pafs.FileType.File:
        raise LeaseLost(f"run {run_id} no longer holds {root}: another job took its lease over; nothing more is "
                        "committed by this run")


class OutputLease:
    """Context manager: holds ``output``'s lease for ``run_id`` while open.

    Raises:
        OutputLocked: (entering) another live job holds the output.
        OSError: the lease file cannot be written.
    """

    def __init__(self, output: str, run_id: str, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.output = redact_credentials(output)  # as messages show it
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.fs, self.root = filesystem_and_path(output)
        self.path = lease_path(self.root, run_id)
        self.taken_over: list[Holder] = []  # stale leases this job removed
        self.lost = False  # set by the heartbeat when the lease file was removed by another job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Write this job's lease, remove stale ones, refuse if another live one exists (see the module)."""
        self.fs.create_dir(f"{self.root}/{LEASE_DIR}", recursive=True)
        publish(self.fs, self.path, self._record)
        live = []
        for holder in self.holders():
            if holder.path == self.path:
                continue
            if self._is_stale(holder):
                try:
                    self.fs.delete_file(holder.path)
                except FileNotFoundError:
                    pass  # another job starting now removed it first; seeing each other, at least one refuses
                self.taken_over.append(holder)
                logger.warning("took over the lease of %s: stale", holder.describe())
            else:
                live.append(holder)
        if live:
            self.fs.delete_file(self.path)
            raise OutputLocked(
                f"{self.output} is being written by another job: {live[0].describe()}. One job writes an output "
                f"at a time. If that job is dead, its lease is taken over once its heartbeat is {self.ttl_s:.0f} s "
                f"old (or at once on its own host); to take it over now, delete "
                f"{location(self.output, posixpath.relpath(live[0].path, self.root))}.")
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def holders(self) -> list[Holder]:
        """Every lease file of the output, oldest heartbeat first."""
        now = time.time()
        holders = []
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{LEASE_DIR}", allow_not_found=True)):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
                continue
            try:
                with self.fs.open_input_stream(info.path) as stream:
                    record = json.loads(stream.read())
            except (OSError, ValueError):
                record = {}  # deleted meanwhile, or not a lease: judged by its age alone
            age = now - info.mtime.timestamp() if info.mtime else 0.0
            holders.append(Holder(info.path, str(record.get("run_id", info.base_name)), str(record.get("host", "?")),
                                  int(record.get("pid", -1)), str(record.get("started_at", "?")), age))
        return sorted(holders, key=lambda holder: -holder.age_s)

    def _is_stale(self, holder: Holder) -> bool:
        if holder.age_s > self.ttl_s:
            return True
        return holder.host == socket.gethostname() and holder.pid > 0 and not _process_exists(holder.pid)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                check_held(self.fs, self.root, self.run_id)
                publish(self.fs, self.path, self._record)
            except LeaseLost as error:
                self.lost = True
                logger.error("%s", error)
                return
            except OSError as error:  # a transient failure; the next beat tries again
                logger.warning("lease heartbeat failed: %s", error)

    def check(self) -> None:
        """Raise `LeaseLost` if another job took the lease over."""
        if self.lost:
            raise LeaseLost(f"run {self.run_id} lost the lease of {self.output} to another job")
        check_held(self.fs, self.root, self.run_id)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file (unless another job has taken it over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.lost:
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class OutputLeases:
    """The leases of several outputs held together (a run writing one output per method): all are taken,
    or none (`OutputLocked` from the first held by another job, after releasing those taken)."""

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
