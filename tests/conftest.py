"""Shared fixtures: a tiny random-weight CLIP checkpoint saved to disk and loaded through `from_pretrained`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

# The real tower's geometry (336 px, 14 px patches -> 24x24 = 576 patches) with a tiny width and depth.
TINY_VISION = dict(
    image_size=336,
    patch_size=14,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    projection_dim=16,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=64,
    projection_dim=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full `CLIPModel` checkpoint (vision + text, like openai/clip-vit-large-patch14-336), random weights."""
    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (the job reuses an initialised Ray)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # log_to_driver, as the job starts it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's, see `s3_server.py`) on 127.0.0.1; yields its ``host:port``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3_server.py")), "127.0.0.1", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the local S3 server did not start")
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 client of `s3_server` and the URI part that reaches it: ``(client, credentials, options)``,
    as in ``s3://{credentials}bucket/key?{options}`` (credentials travel with pyarrow's filesystem object)."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3_server}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    return client, "test:test@", f"endpoint_override={s3_server}&scheme=http&region=us-east-1"
