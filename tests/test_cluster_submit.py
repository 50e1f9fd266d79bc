"""The same job script submitted to a Ray cluster: a local head on 127.0.0.1, `ray job submit --working-dir .`."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from media import video

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` bound to 127.0.0.1 with token auth on (Ray's default); the whole group is killed after."""
    gcs_port, dashboard_port = free_port(), free_port()
    # A token of its own: `ray start --head` with token auth on needs one (it writes ~/.ray/auth_token only
    # when RAY_AUTH_MODE is unset), and a fresh machine has none.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={free_port()}",  # not 52365, which another Ray here may hold
         "--include-dashboard=true", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        # Ready means able to run a job: the dashboard answers before its job agent does.
        deadline = time.time() + 180
        probe = ["ray", "job", "submit", "--address", address, "--", "python", "-c", "pass"]
        while subprocess.run(probe, env=env, capture_output=True).returncode:
            assert head.poll() is None and time.time() < deadline, "ray head did not come up"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started share this group
        head.wait()
        log.close()
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(gcs_port) in current.read_text():
            current.unlink()  # so later local `ray.init()` calls do not look for the stopped head


def test_submitted_job_writes_the_same_output_contract(ray_head, tmp_path, tiny_clip_dir):
    address, env = ray_head
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("h265_video.mp4", "video_90.mov", "corrupted.mp4"):
        (inputs / name).symlink_to(video(name))
    output = tmp_path / "out"
    result = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "jobs/encode_videos.py", "--input", str(inputs), "--output", str(output),
         "--model", str(tiny_clip_dir), "--num-frames", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inputs 3: encoded 2, partly failed 1, failed 0" in result.stdout

    shards = pads.dataset(output / "shards", format="parquet").to_table(columns=["source_path", "frame_index"])
    frames = {}
    for row in shards.to_pylist():
        frames.setdefault(Path(row["source_path"]).name, []).append(row["frame_index"])
    assert {name: sorted(f) for name, f in frames.items()} == {"h265_video.mp4": [0, 4, 9], "video_90.mov": [0, 1, 2],
                                                              "corrupted.mp4": [0, 24]}
    errors = pads.dataset(output / "errors", format="parquet").to_table().to_pylist()
    assert [(Path(r["source_path"]).name, r["frame_indices"]) for r in errors] == [("corrupted.mp4", [49])]
    assert (output / "manifest.json").exists()
