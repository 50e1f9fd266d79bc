"""Still images (JPEG, PNG, WebP) as upright RGB arrays, with decompression bombs refused before decoding."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from operators.decode import MediaError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64_000_000  # e.g. 8000 x 8000; far above any AnyRes grid, far below an OOM


class ImageDecodeError(MediaError):
    """An image that is missing, not a supported format, too large or damaged."""


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to ``[H, W, 3]`` uint8 RGB with its EXIF orientation applied.

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded.
    """
    try:
        with Image.open(path, formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    path, f"{width}x{height} image exceeds max_pixels={max_pixels} (decompression bomb?)"
                )
            upright = ImageOps.exif_transpose(image)
            return np.array(upright.convert("RGB"))  # writable: torch wraps it without a copy
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, f"decompression bomb refused: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(path, f"not a {'/'.join(SUPPORTED_FORMATS)} image") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError(path, f"cannot decode image: {error}") from error
