"""An embedded local Ray that does not outlive its driver, even one killed by SIGKILL.

`ray.init()` without a cluster address starts a local Ray whose processes are children of the
driver: GCS, raylet, dashboard, monitor and log monitor. Ray binds those to the driver with
``PR_SET_PDEATHSIG`` (``fate_share`` in ``ray/_private/services.py``), so they die with it, however it
dies. The raylet's own children are not bound that way: the dashboard agent, the runtime-env agent and
the workers (and what those start, such as the decoder child of `pipeline.child`). Each notices on
its own that the raylet is gone; measured with Ray 2.60 after ``kill -9`` of the driver:

* workers exit 1-4 s later (the core worker shuts down when its raylet connection fails);
* the two agents see the raylet die at once, but then report it to the GCS, which died too, through
  ``publish_error_to_driver``, whose 60 s timeout is written into Ray's code: they linger for a minute,
  and no setting shortens that (``RAY_gcs_rpc_server_reconnect_timeout_s=3`` changes nothing).

Ray's other mechanisms do not cover this: its reaper (``ray_process_reaper.py``) is only started where
the kernel cannot fate-share, and it kills a process group, which the workers leave (each runs in a
group of its own); the raylet's subreaper and process-group options
(``RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper``, ``RAY_process_group_cleanup_enabled``)
clean up after a worker that exits, not after the raylet. An environment variable set for `ray.init()`
does reach every process of the session, but the agents overwrite what ``/proc/PID/environ`` shows
when they set their process titles, so it cannot identify them afterwards.

So `init_ray` adds one small watchdog, and only to a Ray that its own `ray.init()` starts: a cluster it
joins (``--ray-address``, ``RAY_ADDRESS``, or a ``ray start`` on this machine that `ray.init()` finds)
is never watched, and the watchdog is stopped as soon as `ray.init()` returns having joined one.

* Which session: a Ray that a process starts lives in ``<Ray temp dir>/session_<time>_<its pid>``
  (``ray/_private/node.py``). So the watchdog, given the driver's pid, knows the session directories
  of the Ray its driver starts without being told: those named so that were not there when it was
  started (the driver lists those first; a stale directory of an earlier process with the same pid may
  belong to a live ``ray start`` cluster). It therefore covers a driver killed during `ray.init()` too.
* Which processes: every Ray process of a session, and every process those start with inherited
  output, holds files open for writing under the session directory (its logs); no process of another
  session or user's cluster does, and a reader such as ``tail -f`` holds them read-only.
* When: started just before `ray.init()`, as the driver's child in a session of its own (a signal to
  the job's process group or terminal does not reach it), it notices the driver's death as a change of
  its own parent pid (it is re-parented), checked every 0.2 s: exact however the driver dies, with no
  descriptor that a fork of the driver could keep open, and no reused pid to be fooled by.
* Then it SIGKILLs those processes and scans again until three scans in a row (0.6 s) find none, and
  exits. SIGKILL, not SIGTERM: the driver that would use any result is gone, and a handler could stall
  on the dead GCS as the agents do.

A clean exit is unchanged: `ray.shutdown()` (the job's, or Ray's atexit hook) stops the session as
before, and the watchdog then finds nothing and exits. Linux only (``/proc``); elsewhere Ray starts as
before, without a watchdog.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import time

POLL_S = 0.2
QUIET_SCANS = 3  # scans in a row that must find nothing before the watchdog exits
REAP_LIMIT_S = 30.0

logger = logging.getLogger(__name__)
_watchdogs: list = []  # the watchdogs (Popen) this process started, kept while it lives


def _session_names(temp_dir: str, driver_pid: int) -> set[str]:
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return set()
    return {name for name in names if name.startswith("session_") and name.endswith(f"_{driver_pid}")}


def init_ray(**init_kwargs) -> bool:
    """`ray.init(**init_kwargs)`; a local Ray it starts is ended by a watchdog once this process is gone,
    however it ends (see the module docstring). Returns whether it started a local Ray."""
    import subprocess

    import ray

    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # Ray before 2.4x
        from ray._private.utils import get_ray_temp_dir as get_default_ray_temp_dir

    watchdog = None
    if sys.platform.startswith("linux"):
        temp_dir = init_kwargs.get("_temp_dir") or get_default_ray_temp_dir()
        watchdog = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), temp_dir,
             *sorted(_session_names(temp_dir, os.getpid()))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _watchdogs.append(watchdog)
    ray.init(**init_kwargs)
    node = ray._private.worker._global_node
    started = bool(node.head)  # ray.init started a head node here; it is not one when it only connected
    if watchdog is not None and not started:  # joined a cluster: not ours to watch
        _watchdogs.remove(watchdog)
        watchdog.kill()
        watchdog.wait()
    elif watchdog is not None:
        session_dir = node.get_session_dir_path()
        if (os.path.realpath(os.path.dirname(session_dir)) != os.path.realpath(temp_dir)
                or not session_dir.endswith(f"_{os.getpid()}")):
            logger.warning("the embedded Ray's session %s is not where its watchdog looks (%s/session_*_%d): "
                           "its processes may outlive this one if it is killed", session_dir, temp_dir,
                           os.getpid())
    return started


def session_processes(session_dirs: list[str]) -> list[int]:
    """Pids of the processes (other than this one) holding a file open for writing under a session dir."""
    prefixes = tuple(os.path.realpath(path) + os.sep for path in session_dirs)
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)  # PermissionError for another user's process
        except OSError:
            continue
        for fd in fds:
            try:
                # The link's write bit is the descriptor's access mode (proc(5)).
                if (os.lstat(f"{fd_dir}/{fd}").st_mode & stat.S_IWUSR
                        and os.readlink(f"{fd_dir}/{fd}").startswith(prefixes)):
                    pids.append(int(name))
                    break
            except OSError:
                continue
    return pids


def watch(driver_pid: int, temp_dir: str, existing: set[str]) -> None:
    """Wait until the driver is gone, then SIGKILL the processes of the Ray sessions it started."""
    while os.getppid() == driver_pid:
        time.sleep(POLL_S)
    sessions = [os.path.join(temp_dir, name) for name in _session_names(temp_dir, driver_pid) - existing]
    deadline = time.monotonic() + REAP_LIMIT_S
    quiet = 0
    while sessions and quiet < QUIET_SCANS and time.monotonic() < deadline:
        pids = session_processes(sessions)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        quiet = 0 if pids else quiet + 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], set(sys.argv[3:]))
