"""Batched torch preprocessing equivalent to the model's `CLIPImageProcessor`, plus LLaVA's pad-to-square.

``crop`` (the processor's own recipe): resize the shortest side to S (bicubic), centre-crop S×S,
scale to [0, 1], normalise with the CLIP mean/std. ``pad`` (LLaVA's ``image_aspect_ratio="pad"``):
pad to a square with the mean colour, then resize to S×S. Both resize in the decoder when they can:
`decode_size` is the size to have the decoder scale to, and the resize here is then skipped. Frames that arrive
at another size (images, AnyRes canvases) are resized with antialiased bicubic interpolation and
rounded to uint8, as the PIL processor does; the tests measure the gap to `CLIPImageProcessorPil`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["crop", "pad"]


def resize_uint8(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize of ``images [B, H, W, 3]`` uint8 to ``[B, height, width, 3]`` uint8."""
    if images.shape[1:3] == (height, width):
        return images
    channels_first = rearrange(images, "b h w c -> b c h w").float()
    resized = F.interpolate(channels_first, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return rearrange(resized.round().clamp(0, 255).to(torch.uint8), "b c h w -> b h w c")


@dataclass(frozen=True)
class Preprocessing:
    """How frames become model input: ``mode`` ("crop" or "pad"), input size S and normalisation."""

    mode: ResizeMode = "crop"
    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"preprocessing mode must be 'crop' or 'pad', got {self.mode!r}")

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a ``width``×``height`` frame is resized to before the crop or the pad."""
        size = self.image_size
        if self.mode == "crop":  # shortest side to S, the long side floored, as CLIPImageProcessor does
            short, long = sorted((width, height))
            long = int(size * long / short)
            return (size, long) if width <= height else (long, size)
        scale = size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def square(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``frames [B, H, W, 3]`` uint8 RGB (one size per batch) → ``[B, S, S, 3]`` uint8, cropped or padded."""
        images = torch.as_tensor(frames)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        width, height = self.decode_size(images.shape[2], images.shape[1])
        images = resize_uint8(images, width, height)  # no-op when the decoder already resized
        size = self.image_size
        if self.mode == "crop":
            top, left = (height - size) // 2, (width - size) // 2
            return images[:, top : top + size, left : left + size]
        fill = torch.tensor([int(255 * m) for m in self.mean], dtype=torch.uint8)
        canvas = fill.expand(images.shape[0], size, size, 3).clone()
        top, left = (size - height) // 2, (size - width) // 2
        canvas[:, top : top + height, left : left + width] = images
        return canvas

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, S, S, 3]`` uint8 (any device) → ``[B, 3, S, S]`` float32 model input on that device."""
        pixels = rearrange(images, "b h w c -> b c h w").float() / 255.0
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``frames [B, H, W, 3]`` uint8 RGB (one size per batch) → ``[B, 3, S, S]`` float32 model input."""
        return self.normalize(self.square(frames))
