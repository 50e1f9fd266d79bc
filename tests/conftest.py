"""Shared fixtures: tiny random-weight checkpoints of each tower family (saved to disk with the image-processor
config their real counterparts publish, loaded through `from_pretrained`), one Ray, a local S3 server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel,
                          Siglip2VisionConfig, Siglip2VisionModel, ViTConfig, ViTForImageClassification)

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


TINY_BLOCKS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
HALF = [0.5, 0.5, 0.5]
# Each family's preprocessor_config.json in the form its hub checkpoint publishes (sizes scaled where noted).
PROCESSORS = {
    "clip": {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "size": 336,
             "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3,  # openai/clip-vit-large-patch14-336
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "siglip": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type":
               "SiglipImageProcessor", "image_mean": HALF, "image_std": HALF, "resample": 3,  # so400m/14-384
               "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}},
    "siglip2": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type":
                "Siglip2ImageProcessor", "image_mean": HALF, "image_std": HALF, "max_num_patches": 64,  # naflex: 256
                "patch_size": 16, "resample": 2, "rescale_factor": 1 / 255},
    "vit": {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "ViTImageProcessor",
            "image_mean": HALF, "image_std": HALF, "resample": 2, "rescale_factor": 1 / 255,  # vit-base-patch16-224
            "size": {"height": 224, "width": 224}},
    "dinov2": {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
               "do_rescale": True, "do_resize": True, "image_processor_type": "BitImageProcessor",  # dinov2-base
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
               "rescale_factor": 1 / 255, "size": {"shortest_edge": 256}},
}


def tiny_tower(family: str):
    """A random-weight model of ``family`` saved the way its real checkpoint is: CLIP and SigLIP whole (vision +
    text), SigLIP 2 NaFlex as a vision tower, ViT as an ImageNet classifier (like ../shared's ViT-Ti), DINOv2 bare."""
    torch.manual_seed(0)
    if family == "clip":
        return CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16))
    if family == "siglip":  # so400m's geometry: 384 px, 14-px patches → 27×27 (6 px unused)
        return SiglipModel(SiglipConfig(vision_config=dict(image_size=384, patch_size=14, **TINY_BLOCKS),
                                        text_config=dict(vocab_size=64, **TINY_BLOCKS)))
    if family == "siglip2":  # 8×8 position grid of 16-px patches: 128 px
        return Siglip2VisionModel(Siglip2VisionConfig(num_patches=64, patch_size=16, **TINY_BLOCKS))
    if family == "vit":
        return ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, num_labels=5, **TINY_BLOCKS))
    if family == "dinov2":  # position embeddings for 518 px, interpolated to the processor's 224
        return Dinov2Model(Dinov2Config(image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, mlp_ratio=2))
    raise ValueError(family)


def save_tower(family: str, path: Path) -> Path:
    tiny_tower(family).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSORS[family]))
    return path


FAMILIES = tuple(PROCESSORS)


@pytest.fixture(scope="session")
def tower_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family name → a tiny checkpoint folder of it (`tiny_tower`, with its processor config)."""
    return {family: save_tower(family, tmp_path_factory.mktemp(f"tiny-{family}")) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_clip_dir(tower_dirs) -> Path:
    """A full `CLIPModel` checkpoint (vision + text, like openai/clip-vit-large-patch14-336), random weights."""
    return tower_dirs["clip"]


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
