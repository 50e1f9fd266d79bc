"""Batched torch preprocessing equivalent to a tower's Hugging Face image processor, plus LLaVA's pad-to-square.

``crop`` (`CLIPImageProcessor`, DINOv2's `BitImageProcessor`): resize the shortest side to R (bicubic),
centre-crop S×S (R = S for CLIP). ``squash`` (`SiglipImageProcessor`, `ViTImageProcessor`): resize to S×S,
the aspect ratio not kept. ``pad`` (LLaVA's ``image_aspect_ratio="pad"``): pad to a square with the mean
colour, then resize to S×S. Then scale to [0, 1] and normalise with the checkpoint's mean/std
(`operators.towers.checkpoint_preprocessing` reads them). All three resize in the decoder when they can:
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

ResizeMode = Literal["crop", "squash", "pad"]
RESIZE_MODES: tuple[str, ...] = ("crop", "squash", "pad")


def resize_uint8(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize of ``images [B, H, W, 3]`` uint8 to ``[B, height, width, 3]`` uint8."""
    if images.shape[1:3] == (height, width):
        return images
    channels_first = rearrange(images, "b h w c -> b c h w").float()
    resized = F.interpolate(channels_first, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return rearrange(resized.round().clamp(0, 255).to(torch.uint8), "b c h w -> b h w c")


@dataclass(frozen=True)
class Preprocessing:
    """How frames become model input: ``mode`` ("crop", "squash" or "pad"), the square input size S (px), for
    "crop" the shortest side R (px) before the crop (default S), and the normalisation (RGB, on [0, 1] values)."""

    mode: ResizeMode = "crop"
    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"preprocessing mode must be one of {', '.join(RESIZE_MODES)}; got {self.mode!r}")
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", self.image_size)
        if self.resize_size < self.image_size:
            raise ValueError(f"cannot crop {self.image_size} px from a shortest side resized to {self.resize_size} px")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_metadata(self) -> dict:
        """What the shards record about it (`from_metadata` rebuilds it)."""
        return {"mode": self.mode, "image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_metadata(cls, recorded: dict) -> Preprocessing:
        return cls(mode=recorded["mode"], image_size=recorded["image_size"], resize_size=recorded["resize_size"],
                   mean=tuple(recorded["mean"]), std=tuple(recorded["std"]))

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a ``width``×``height`` frame is resized to before the crop or the pad."""
        size = self.image_size
        if self.mode == "squash":
            return size, size
        if self.mode == "crop":  # shortest side to R, the long side floored, as CLIPImageProcessor does
            short, long = sorted((width, height))
            long = int(self.resize_size * long / short)
            return (self.resize_size, long) if width <= height else (long, self.resize_size)
        scale = size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def square(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``frames [B, H, W, 3]`` uint8 RGB (one size per batch) → ``[B, S, S, 3]`` uint8, cropped, squashed or
        padded. Raises ValueError for anything but uint8 ``[B, H, W, 3]``."""
        images = torch.as_tensor(frames)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        width, height = self.decode_size(images.shape[2], images.shape[1])
        images = resize_uint8(images, width, height)  # no-op when the decoder already resized
        size = self.image_size
        if self.mode == "squash":
            return images
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
