"""Still images (JPEG, PNG, WebP) as upright 8-bit RGB arrays: their true pixel values, or a typed error.

* Size: read from the header and checked against ``max_pixels`` before any pixel is decoded; Pillow's
  own decompression-bomb limit is raised to ``max_pixels`` for the open, so the flag is the limit that
  applies (above Pillow's default of about 179 Mpx too).
* Headers that claim more than the data can hold (a 100-byte PNG "of" 7000x7000, a JPEG whose frame
  header was patched) are refused before the claimed size is allocated: Pillow would fill the missing
  rows with zeros (PNG) or grey (JPEG) without a word. A PNG's image data must inflate to the bytes its
  header implies (counted by streaming the zlib data, never held); a Huffman-coded JPEG needs at least
  one bit per 8x8 luma block (every block codes its DC coefficient, and no Huffman code is shorter).
  Arithmetic-coded JPEGs (rare) can go below that and are not checked.
* High bit depth: 16-bit greyscale (Pillow modes ``I;16*``) and 32-bit integer (``I``) are scaled to
  8 bits (``round(v / 257)``, so 65535 → 255); Pillow's own conversion to RGB would clip them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps

from operators.errors import MediaError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64_000_000  # e.g. 8000 x 8000; far above any AnyRes grid, far below an OOM
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # greyscale, 0..65535
INFLATE_CHUNK = 1 << 20  # bytes of inflated PNG data held at once while counting
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7)  # SOF markers of Huffman-coded JPEGs


class ImageDecodeError(MediaError):
    """An image that is missing, not a supported format, too large, inconsistent or damaged."""


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow refuses images above 2 x ``Image.MAX_IMAGE_PIXELS`` on open: lift that to ``max_pixels``
    (this module checks ``max_pixels`` itself; None: no limit) and silence its warning between the two."""
    default = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, default or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = default


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to ``[H, W, 3]`` uint8 RGB with its EXIF orientation applied.

    Raises:
        ImageDecodeError: not a JPEG/PNG/WebP, larger than ``max_pixels``, a header that claims more
            pixels than the data holds, an unsupported pixel mode, or damaged/truncated data.
    """
    try:
        with _pillow_pixel_limit(max_pixels), Image.open(path, formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    path, f"{width}x{height} image exceeds max_pixels={max_pixels} (decompression bomb?)"
                )
            if image.mode not in EIGHT_BIT_MODES + SIXTEEN_BIT_MODES:
                raise ImageDecodeError(path, f"unsupported pixel mode {image.mode!r}")
            _check_data_fills_header(path, image)
            return to_rgb8(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, f"decompression bomb refused: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(path, f"not a {'/'.join(SUPPORTED_FORMATS)} image") from error
    except (OSError, ValueError, SyntaxError, zlib.error) as error:
        raise ImageDecodeError(path, f"cannot decode image: {error}") from error


def image_format(path: str) -> str:
    """The format Pillow reads from the header, lower case ("jpeg", "png", "webp"); no pixel is decoded,
    so no size limit applies."""
    with _pillow_pixel_limit(None), Image.open(path, formats=SUPPORTED_FORMATS) as image:
        return image.format.lower()


def to_rgb8(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a decoded image: 8-bit modes through Pillow's conversion, 16-bit and
    32-bit integer greyscale scaled by 1/257 (clipped to 0..65535 first), replicated to three channels."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # [H, W]
        grey = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"))  # writable: torch wraps it without a copy


def _check_data_fills_header(path: str, image: Image.Image) -> None:
    width, height = image.size
    if image.format == "PNG":
        expected = _png_raw_bytes(path)
        found = _inflated_idat_bytes(path, limit=expected + 1)
        if found < expected:
            raise ImageDecodeError(path, f"the PNG header claims {width}x{height} but its image data holds "
                                         f"{found} of the {expected} bytes that needs (truncated or lying header)")
    elif image.format == "JPEG" and _jpeg_frame_marker(path) in HUFFMAN_FRAMES:
        blocks = -(-width // 8) * -(-height // 8)
        size = os.path.getsize(path)
        if size * 8 < blocks:
            raise ImageDecodeError(path, f"the JPEG header claims {width}x{height} ({blocks} blocks of 8x8) but the "
                                         f"file has {size} bytes, under one bit per block (truncated or lying header)")


def _jpeg_frame_marker(path: str) -> int | None:
    """The start-of-frame marker (0xC0..0xCF but DHT/JPG/DAC) of a JPEG, walking its segments (ITU T.81 B.1)."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\xff\xd8":
            return None
        while True:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0xFF:
                return None
            marker, length = head[1], struct.unpack(">H", head[2:])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return marker
            if marker == 0xDA:  # start of scan before any frame header
                return None
            handle.seek(length - 2, 1)


def _png_raw_bytes(path: str) -> int:
    """Bytes the PNG's image data must inflate to: one filter byte per row plus the packed samples,
    summed over the seven Adam7 passes when interlaced (PNG specification, sections 7.2 and 8.2)."""
    with open(path, "rb") as handle:
        handle.seek(16)  # signature, IHDR length and type
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", handle.read(13))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]

    def raw(w: int, h: int) -> int:
        return h * (1 + -(-w * channels * depth // 8)) if w and h else 0

    if not interlace:
        return raw(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(raw(-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in passes)


def _inflated_idat_bytes(path: str, limit: int) -> int:
    """How many bytes the PNG's IDAT chunks inflate to, counting at most ``limit`` (memory: one chunk)."""
    inflater = zlib.decompressobj()
    total = 0
    with open(path, "rb") as handle:
        handle.seek(8)
        while total < limit:
            head = handle.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind != b"IDAT":
                handle.seek(length + 4, 1)  # other chunks (and their CRC) are not read
                continue
            data = handle.read(length)
            handle.seek(4, 1)  # CRC: Pillow checks it while decoding
            while data and total < limit:
                total += len(inflater.decompress(data, INFLATE_CHUNK))
                data = inflater.unconsumed_tail
    return total
