"""The job on a two-node Ray cluster on this machine, compared with the same job on an embedded Ray.

A head (`ray start --head`, 1 CPU) and a second node (`ray start --address`, 1 CPU), both with
``--node-ip-address=127.0.0.1`` and each with a custom resource that names it. The decoder and the
encoder actor each take 1 CPU, so they cannot share a node: the job must spread over both, which Ray's
state API (``list_actors``/``list_tasks``, dead actors and finished tasks included) then shows.

Why 1 + 1 CPUs and ``--num-decoders 1``: one decoder and one encoder on one CPU each can only be
placed one per node, so where each lands proves nothing about scheduling luck.

The cluster gets a Ray temp dir of its own (so its ``ray_current_cluster`` file never makes a later
``ray.init()`` join it), and so does the embedded run (``RAY_TMPDIR``: a stale
``/tmp/ray/ray_current_cluster`` would make its ``ray.init()`` try to join a dead cluster); both get
``PYTHONPATH`` set to this checkout (so the workers run this code whatever the editable install points
at). Token authentication stays on, as Ray 2.60 sets it for a head: every process that talks to the
cluster gets ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from media import video

ROOT = Path(__file__).resolve().parents[1]
KEY = ["video_id", "frame_index", "tile_index"]
CLIPS = ["h265_video.mp4", "video_90.mov", "corrupted.mp4", "nasa_13013.mp4"]
ROLES = {"head": "two_nodes_test_head", "second": "two_nodes_test_second"}  # role -> custom resource
START_LIMIT_S = 180  # a loaded 2-core machine can take a minute per node
JOB_LIMIT_S = 300

# Run in a fresh interpreter with the cluster's environment (token auth): Ray's state API through the head's
# dashboard. Prints JSON.
NODES_PROBE = """
import json, sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1], detail=True, limit=100)
print(json.dumps([{"node_id": n.node_id, "state": n.state, "resources": n.resources_total} for n in nodes]))
"""
WORK_PROBE = """
import json, sys
from ray.util.state import list_actors, list_tasks
address = sys.argv[1]
# 10000: the API server's maximum; an answer cut short raises (raise_on_missing_output)
actors = list_actors(address=address, detail=True, limit=10000)
tasks = list_tasks(address=address, detail=True, limit=10000)
print(json.dumps({
    "actors": [{"actor_id": a.actor_id, "class_name": a.class_name, "state": a.state, "node_id": a.node_id,
                "job_id": a.job_id} for a in actors],
    "tasks": [{"name": t.name, "type": t.type, "state": t.state, "node_id": t.node_id, "job_id": t.job_id,
               "actor_id": t.actor_id} for t in tasks],
}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}\n"
    except OSError as error:
        return f"--- {path.name}: {error}\n"


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def project_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_ADDRESS, with this checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


class Cluster:
    def __init__(self, gcs_port: int, env: dict[str, str], logs: list[Path], temp_dir: str) -> None:
        self.gcs_port = gcs_port
        self.address = f"127.0.0.1:{gcs_port}"
        self.env = env
        self.logs = logs
        self.temp_dir = temp_dir
        self.nodes: dict[str, str] = {}  # role -> node id

    def logs_text(self) -> str:
        return "".join(tail(path) for path in self.logs)

    def probe(self, script: str, timeout: float = 60):
        result = subprocess.run([sys.executable, "-c", script, self.address], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode:
            return None, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1]), ""

    def wait_for_nodes(self, count: int, processes: list[subprocess.Popen]) -> list[dict]:
        """Alive nodes, once ``count`` of them are up and the state API answers (bounded wait)."""
        deadline = time.monotonic() + START_LIMIT_S
        last = ""
        while True:
            for process in processes:
                assert process.poll() is None, f"a `ray start` exited ({process.args})\n{last}\n{self.logs_text()}"
            try:
                nodes, error = self.probe(NODES_PROBE, timeout=30)
            except subprocess.TimeoutExpired:
                nodes, error = None, "the state API probe timed out"
            alive = [node for node in nodes or [] if node["state"] == "ALIVE"]
            if len(alive) >= count:
                return alive
            last = error or f"alive nodes: {alive}"
            assert time.monotonic() < deadline, (f"{count} alive node(s) not reported within {START_LIMIT_S} s; "
                                                 f"last probe: {last}\n{self.logs_text()}")
            time.sleep(2)


def kill_cluster(processes: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGKILL each `ray start` group, then any process still writing under the Ray temp dir ``temp_dir``, which
    is this test's own (Ray workers run in process groups of their own), bounded."""
    from pipeline.embedded_ray import session_processes

    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    deadline, quiet = time.monotonic() + 30, 0
    while quiet < 3 and time.monotonic() < deadline:
        pids = session_processes([temp_dir])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        quiet = 0 if pids else quiet + 1
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head (1 CPU) and a second node (1 CPU) on 127.0.0.1, with token auth; both killed after."""
    logs_dir = tmp_path_factory.mktemp("two-nodes")
    # Short: Ray's Unix sockets live under it (108-byte limit); its own, so no `ray_current_cluster` file of
    # this cluster is ever where a plain `ray.init()` looks.
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    gcs_port = free_port()
    env = project_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))  # a fresh machine has no token
    ray = ray_executable()
    logs = [logs_dir / "head.log", logs_dir / "second.log"]
    cluster = Cluster(gcs_port, env, logs, temp_dir)
    # Every port Ray would otherwise take at a fixed default (6379, 8265, 10001, 52365) is a free one: another Ray
    # on this machine (an embedded one of another test run) may hold the defaults.
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    processes: list[subprocess.Popen] = []
    handles = []
    try:
        handles.append(open(logs[0], "w"))
        processes.append(subprocess.Popen(
            [ray, "start", "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}", *common,
             "--resources", json.dumps({ROLES["head"]: 1}), f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"],
            stdout=handles[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True))
        cluster.wait_for_nodes(1, processes)
        handles.append(open(logs[1], "w"))
        processes.append(subprocess.Popen(
            [ray, "start", f"--address={cluster.address}", *common,
             "--resources", json.dumps({ROLES["second"]: 1}), f"--dashboard-agent-listen-port={free_port()}"],
            stdout=handles[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True))
        alive = cluster.wait_for_nodes(2, processes)
        for role, resource in ROLES.items():
            ids = [node["node_id"] for node in alive if node["resources"].get(resource)]
            assert len(ids) == 1, f"expected one alive node with {resource}, got {alive}"
            cluster.nodes[role] = ids[0]
        assert len(alive) == 2 and cluster.nodes["head"] != cluster.nodes["second"], alive
        yield cluster
    finally:
        kill_cluster(processes, temp_dir)
        for handle in handles:
            handle.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()  # so later local `ray.init()` calls do not look for the stopped head


def run_job(inputs: Path, output: Path, model: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """The job in a process group of its own; one that outlives `JOB_LIMIT_S` is killed and fails the test with
    what it printed."""
    command = [sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(inputs), "--output",
               str(output), "--model", str(model), "--num-frames", "3", "--num-decoders", "1",
               # one torch thread in both runs: a thread count changes the order of float sums, so the low bits
               "--encoder-threads", "1", *extra]
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"the job did not end within {JOB_LIMIT_S} s: {command}\n{stdout[-3000:]}{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def load(output: Path):
    shards = pads.dataset(output / "shards", format="parquet").to_table()
    errors = pads.dataset(output / "errors", format="parquet").to_table().to_pylist()
    return shards.sort_by([(k, "ascending") for k in KEY]), sorted(errors, key=lambda r: (r["video_id"],
                                                                                          r["frame_indices"]))


def token_bits(shards) -> np.ndarray:
    """Every fp16 token value of every row, in order, as its bit pattern."""
    values = pc.list_flatten(pc.list_flatten(shards["tokens"]))
    return values.to_numpy(zero_copy_only=False).view(np.uint16)


def test_job_on_two_nodes_uses_both_and_matches_the_embedded_run(two_nodes, tmp_path, tiny_clip_dir):
    cluster = two_nodes
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in CLIPS:
        (inputs / name).symlink_to(video(name))

    # The driver joins the cluster (no embedded Ray): --ray-address.
    started = time.monotonic()
    joined = run_job(inputs, tmp_path / "cluster-out", tiny_clip_dir, cluster.env, "--ray-address", cluster.address)
    cluster_s = time.monotonic() - started
    report = joined.stdout[-4000:] + joined.stderr[-6000:]
    assert joined.returncode == 0, report + cluster.logs_text()
    assert "inputs 4: encoded 3, partly failed 1, failed 0" in joined.stdout, report
    assert "Connecting to existing Ray cluster" in joined.stderr, report
    assert f":{cluster.gcs_port}: 1 encoder actor(s) on cpu" in joined.stderr, report  # "Ray at <gcs>: ..."

    # Where the work ran: the job's Ray Data actors (dead by now) and their finished tasks, by node.
    work, error = cluster.probe(WORK_PROBE)
    assert work is not None, f"state API query failed: {error}"
    stages = {"decode": "MapWorker(FlatMap(DecodeInputs))", "encode": "MapWorker(MapBatches(EncodeTokens))"}
    actors = {stage: [a for a in work["actors"] if a["class_name"] == name] for stage, name in stages.items()}
    assert len(actors["decode"]) == 1 and len(actors["encode"]) == 1, f"one decoder and one encoder: {actors}"
    done = {stage: {t["node_id"] for t in work["tasks"]
                    if t["name"] == f"{name}.submit" and t["state"] == "FINISHED"} for stage, name in stages.items()}
    writes = [t for t in work["tasks"] if t["name"] == "Write" and t["type"] == "NORMAL_TASK"]
    assert writes and all(t["state"] == "FINISHED" for t in writes), f"write tasks: {writes}"
    role = {node_id: name for name, node_id in cluster.nodes.items()}
    placed = {stage: sorted(role.get(node, node) for node in nodes) for stage, nodes in done.items()}
    # Each stage ran its tasks on one node (its one actor's), and the two stages on the two nodes.
    assert placed["decode"] in (["head"], ["second"]) and placed["encode"] in (["head"], ["second"]), placed
    assert {placed["decode"][0], placed["encode"][0]} == {"head", "second"}, placed
    for stage in stages:
        assert {a["node_id"] for a in actors[stage]} == done[stage], (stage, actors[stage], done[stage])
    job_ids = {a["job_id"] for stage in stages for a in actors[stage]} | {t["job_id"] for t in writes}
    assert len(job_ids) == 1, f"one driver's work: {job_ids}"

    # The same inputs on an embedded Ray in a fresh process: no --ray-address, no RAY_ADDRESS, and a Ray temp dir
    # of its own, so that no `ray_current_cluster` file left on this machine (a `ray start` head killed without
    # `ray stop`) makes its `ray.init()` try to join a cluster instead.
    embedded_temp = tempfile.mkdtemp(prefix="ray2e-", dir="/tmp")
    started = time.monotonic()
    try:
        embedded = run_job(inputs, tmp_path / "embedded-out", tiny_clip_dir, project_env(RAY_TMPDIR=embedded_temp))
    finally:
        kill_cluster([], embedded_temp)  # nothing, unless the embedded Ray's watchdog missed something
        shutil.rmtree(embedded_temp, ignore_errors=True)
    embedded_s = time.monotonic() - started
    report = embedded.stdout[-4000:] + embedded.stderr[-6000:]
    assert embedded.returncode == 0, report
    assert "Connecting to existing Ray cluster" not in embedded.stderr, report
    assert f":{cluster.gcs_port}:" not in embedded.stderr, report
    assert "inputs 4: encoded 3, partly failed 1, failed 0" in embedded.stdout, report
    print(f"\ntwo-node run {cluster_s:.1f} s, embedded run {embedded_s:.1f} s; placement {placed}")

    got, got_errors = load(tmp_path / "cluster-out")
    want, want_errors = load(tmp_path / "embedded-out")
    keys = list(zip(*(got[k].to_pylist() for k in KEY)))
    assert len(keys) == len(set(keys)) == 11, "every (video_id, frame_index, tile_index) once, 3 + 3 + 3 + 2 frames"
    assert keys == list(zip(*(want[k].to_pylist() for k in KEY)))
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    for column in got.column_names:
        if column != "tokens":
            assert got[column].to_pylist() == want[column].to_pylist(), column
    # Same model, same CPU math, batches that do not change a frame's result: the same fp16 bits.
    assert np.array_equal(token_bits(got), token_bits(want)), "tokens differ between the two-node and embedded runs"
    assert len(got_errors) == 1 and got_errors == want_errors
