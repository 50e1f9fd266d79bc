"""Shared fixtures: a tiny random-weight CLIP checkpoint saved to disk and loaded through `from_pretrained`."""

from __future__ import annotations

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
