"""An embedded Ray does not outlive its driver (pipeline/embedded_ray.py): after `kill -9` of a driver
that started its own Ray the way the job does, no process of that Ray session is left; a cluster the
driver only joined is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The job's code path to Ray (`_ensure_ray`), then work that leaves workers and a worker's own child
# (as the decoder's `pipeline.child`) running; reports its session and pids, then waits to be killed.
DRIVER = """
import json, os, subprocess, sys, time
import ray
from pipeline.config import EncodeConfig
from pipeline.run import _ensure_ray

_ensure_ray(EncodeConfig(input="unused", output="unused", ray_address=sys.argv[2] or None))

@ray.remote(num_cpus=0)
class Holder:
    def __init__(self):
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def pids(self):
        return os.getpid(), self.child.pid

holders = [Holder.remote() for _ in range(2)]
pids = ray.get([h.pids.remote() for h in holders], timeout=120)
report = {"session": ray._private.worker._global_node.get_session_dir_path(),
          "workers": [w for w, _ in pids], "children": [c for _, c in pids]}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def processes_of(session_dir: str) -> dict[int, str]:
    """{pid: command line} of the processes naming the session directory or holding a file in it open."""
    session = os.path.realpath(session_dir) + os.sep
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = []
            for fd in os.listdir(f"/proc/{name}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{name}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        if session_dir in cmdline or any(link.startswith(session) for link in links):
            found[int(name)] = cmdline
    return found


def watchdogs_of(driver_pid: int) -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"embedded_ray.py {driver_pid} " in cmdline:
            found[int(name)] = cmdline
    return found


def start_driver(tmp_path: Path, address: str = "") -> tuple[subprocess.Popen, dict]:
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # start (or join) exactly as told
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(report_path), address], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + 150  # ray.init on a loaded 2-core machine
    while not report_path.exists():
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.time() < deadline, "the driver did not get its workers going"
        time.sleep(0.2)
    return driver, json.loads(report_path.read_text())


def test_kill_9_of_the_driver_leaves_no_process_of_its_embedded_ray(tmp_path, ray_local):
    driver, report = start_driver(tmp_path)
    watched: dict[int, tuple[int | None, str]] = {}
    try:
        assert report["session"].endswith(f"_{driver.pid}"), "the driver started a Ray of its own, not joined one"
        # The agents are up once the raylet is; give them a moment on a slow machine.
        deadline = time.time() + 30
        while True:
            found = {**processes_of(report["session"]), **watchdogs_of(driver.pid)}
            text = " ".join(found.values())
            if ("DashboardAgent" in text or "dashboard/agent.py" in text) and "RuntimeEnvAgent" in text \
                    or time.time() > deadline:
                break
            time.sleep(0.5)
        found.pop(driver.pid, None)
        watched = {pid: (start_time(pid), cmd) for pid, cmd in found.items()}
        text = " ".join(found.values())
        for what in ("gcs_server", "raylet", "RuntimeEnvAgent", "embedded_ray.py"):
            assert what in text, f"no {what} among the session's processes: {sorted(found.values())}"
        assert "DashboardAgent" in text or "dashboard/agent.py" in text
        assert set(report["workers"]) | set(report["children"]) <= set(watched), (report, sorted(watched))

        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        killed_at = time.time()
        alive = dict(watched)
        while alive and time.time() < killed_at + 20:  # the watchdog needs < 1 s; Ray alone leaves the agents 60 s
            alive = {pid: v for pid, v in alive.items() if v[0] is not None and start_time(pid) == v[0]}
            time.sleep(0.2)
        left = sorted(cmd for _, cmd in alive.values())
        assert not left, f"still alive {time.time() - killed_at:.1f} s after kill -9: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid, (started, _) in watched.items():  # never leak them, even when the test fails
            if started is not None and start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)

    # The tests' shared session in this process (another Ray session) was not touched.    assert_still_runs(ray_local)


def assert_still_runs(ray) -> None:
    @ray.remote
    def ping():
        return "pong"

    assert ray.get(ping.remote(), timeout=60) == "pong"


def test_a_joined_cluster_is_not_watched_and_outlives_a_killed_driver(tmp_path, ray_local):
    """The driver joins the tests' shared session (as with --ray-address): no watchdog stays, and after
    kill -9 of the driver that session's GCS, raylet and agents still run, and it still runs tasks."""
    session_dir = ray_local._private.worker._global_node.get_session_dir_path()
    roles = ("/gcs_server ", "/raylet ", "DashboardAgent", "RuntimeEnvAgent", "dashboard/agent.py",
             "runtime_env/agent/main.py")
    core = {pid: start_time(pid) for pid, cmd in processes_of(session_dir).items() if any(r in cmd for r in roles)}
    assert len(core) >= 4, sorted(processes_of(session_dir).values())
    driver, report = start_driver(tmp_path, ray_local.get_runtime_context().gcs_address)
    children = {pid: start_time(pid) for pid in report["children"]}
    try:
        assert report["session"] == session_dir
        assert not watchdogs_of(driver.pid), "a joined cluster is not watched"
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    time.sleep(2)  # a watchdog would have acted by now
    assert {pid: start_time(pid) for pid in core} == core, "the joined session's processes all still run"
    for pid, started in children.items():  # the sleepers the driver's actors started: Ray may orphan them
        if started is not None and start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)
    assert_still_runs(ray_local)
