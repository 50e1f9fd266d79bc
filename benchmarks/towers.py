"""Random-weight CLIP vision towers for the benchmarks, by geometry (no download, no real weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

TOWERS = {
    # the geometry of openai/clip-vit-large-patch14-336, the default model
    "vit-l": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, projection_dim=768),
    "vit-b": dict(image_size=336, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, projection_dim=512),
    # ViT-B width and depth on the default model's 24x24 patch grid (576 patches per frame, like ViT-L/14-336)
    "vit-b14": dict(image_size=336, patch_size=14, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, projection_dim=512),
    "tiny": dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, projection_dim=16),
}


def save_tower(directory: Path | str, name: str) -> Path:
    """Save a seeded random-weight `CLIPVisionModel` of geometry ``name`` to ``directory``."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWERS[name])).save_pretrained(directory)
    return Path(directory)
