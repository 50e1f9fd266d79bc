"""Image loading: formats, EXIF orientation, and typed errors for bombs and non-images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from operators.images import ImageDecodeError, load_image
from media import decode_frame, video


@pytest.fixture(scope="module")
def real_frame() -> np.ndarray:
    return decode_frame(video("flipping_a_pancake.mkv"), 100)  # 240 x 426


@pytest.mark.parametrize("fmt, suffix, tolerance", [("PNG", "png", 0), ("JPEG", "jpg", 6), ("WEBP", "webp", 8)])
def test_supported_formats_round_trip(tmp_path, real_frame, fmt, suffix, tolerance):
    path = tmp_path / f"frame.{suffix}"
    Image.fromarray(real_frame).save(path, format=fmt, quality=95)
    image = load_image(str(path))
    assert image.shape == real_frame.shape and image.dtype == np.uint8
    assert np.abs(image.astype(float) - real_frame).mean() <= tolerance


def test_exif_orientation_is_applied(tmp_path, real_frame):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(real_frame).save(path, quality=95, exif=exif)
    image = load_image(str(path))
    assert image.shape == (426, 240, 3)
    assert np.abs(image.astype(float) - np.rot90(real_frame, -1)).mean() < 6


def test_rgba_and_greyscale_become_rgb(tmp_path, real_frame):
    for mode in ("RGBA", "L"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(real_frame).convert(mode).save(path)
        assert load_image(str(path)).shape == real_frame.shape


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    # PIL's own header check refuses > 179 Mpx; max_pixels is checked from the header below that
    bomb = tmp_path / "bomb.png"
    Image.new("1", (16384, 16384)).save(bomb)  # 268 Mpx, a few KiB on disk
    with pytest.raises(ImageDecodeError, match="bomb"):
        load_image(str(bomb))
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageDecodeError, match="max_pixels=1000"):
        load_image(str(small), max_pixels=1000)


def test_non_images_and_unsupported_formats_are_typed_errors(tmp_path, real_frame):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    gif = tmp_path / "anim.gif"
    Image.fromarray(real_frame).save(gif)
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(real_frame).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path in (text, gif, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError) as caught:
            load_image(str(path))
        assert caught.value.path == str(path)
