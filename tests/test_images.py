"""Image loading: formats, EXIF orientation, and typed errors for bombs and non-images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from operators.images import ImageDecodeError, image_format, load_image, to_rgb8
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


def pixels(mode: str) -> Image.Image:
    """A 7x5 image in ``mode`` whose values span the mode's range (a reference conversion exists for each)."""
    ramp = np.arange(35).reshape(5, 7)
    if mode == "I;16":
        return Image.fromarray((ramp * 1927).astype(np.uint16))
    if mode == "1":
        return Image.fromarray((ramp % 2).astype(bool))
    rgb = Image.fromarray(np.stack([ramp * 7, 255 - ramp * 7, (ramp * 13) % 256], axis=-1).astype(np.uint8))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_png_mode_converts_to_its_true_8_bit_rgb(tmp_path, mode):
    """8-bit modes match Pillow's own RGB conversion; 16-bit greyscale is scaled (v/257), never clipped."""
    source = pixels(mode)
    path = tmp_path / f"{mode.replace(';', '_')}.png"
    source.save(path)
    with Image.open(path) as saved:
        loaded_mode = saved.mode
        if loaded_mode.startswith("I"):
            reference = np.round(np.asarray(saved).astype(float) / 257).astype(np.uint8)
            reference = np.repeat(reference[:, :, None], 3, axis=2)
        else:
            reference = np.asarray(saved.convert("RGB"))
    image = load_image(str(path))
    assert image.dtype == np.uint8 and image.shape == (5, 7, 3)
    np.testing.assert_array_equal(image, reference)
    if loaded_mode.startswith("I"):
        assert image.max() == round(34 * 1927 / 257) and image.min() == 0, "scaled, not clipped to white"


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_high_bit_depth_greyscale_is_scaled_in_every_byte_order(mode, dtype):
    values = np.array([[0, 257, 32896], [65535, 1000, 65279]])
    image = Image.frombytes(mode, (3, 2), values.astype(dtype).tobytes())
    expected = np.repeat(np.array([[0, 1, 128], [255, 4, 254]], np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(to_rgb8(image), expected)


def test_cmyk_jpeg_and_palette_with_transparency_convert_as_pillow_does(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    pixels("CMYK").save(cmyk, quality=95)
    with Image.open(cmyk) as saved:
        np.testing.assert_array_equal(load_image(str(cmyk)), np.asarray(saved.convert("RGB")))
    palette = tmp_path / "palette.png"
    pixels("P").save(palette, transparency=3)
    with Image.open(palette) as saved:
        np.testing.assert_array_equal(load_image(str(palette)), np.asarray(saved.convert("RGB")))


def test_sixteen_bit_greyscale_png_keeps_its_grey_levels():
    from media import hostile

    image = load_image(hostile("gray16.png"))
    with Image.open(hostile("gray16.png")) as source:
        values = np.asarray(source).astype(float)
    assert image.shape == (240, 426, 3) and image.std() > 20, "a real frame, not a white sheet"
    np.testing.assert_array_equal(image[:, :, 0], np.round(values / 257).astype(np.uint8))


@pytest.mark.parametrize("name, claim", [
    ("lying_7000.png", "the PNG header claims 7000x7000 but its image data holds 21001 of the 147007000 bytes"),
    ("lying_sof.jpg", "the JPEG header claims 7000x7000 (765625 blocks of 8x8) but the file has 28988 bytes"),
])
def test_headers_that_claim_more_than_the_data_holds_are_refused_before_allocating(name, claim):
    import tracemalloc

    from media import hostile

    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as caught:
            load_image(hostile(name))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert claim in caught.value.reason
    assert peak < 20_000_000, f"{peak} bytes allocated before refusing"


def test_a_png_cut_short_inside_its_data_is_refused(tmp_path, real_frame):
    """A real PNG whose zlib stream was replaced by a shorter, complete one: Pillow would pad it with black."""
    import struct
    import zlib

    path = tmp_path / "short.png"
    Image.fromarray(real_frame).save(path)
    data = path.read_bytes()
    rows = zlib.compress(b"".join(b"\x00" + real_frame[r].tobytes() for r in range(100)))  # 100 of 240 rows
    idat = struct.pack(">I", len(rows)) + b"IDAT" + rows + struct.pack(">I", zlib.crc32(b"IDAT" + rows))
    start = data.index(b"IDAT") - 4
    path.write_bytes(data[:start] + idat + data[data.index(b"IEND") - 4:])
    with pytest.raises(ImageDecodeError, match="image data holds 127900 of the 306960 bytes"):
        load_image(str(path))


def test_max_image_pixels_above_pillows_own_limit_is_the_limit_that_applies(tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (14000, 13000)).save(big)  # 182 Mpx: Pillow refuses it on open by default
    image = load_image(str(big), max_pixels=200_000_000)
    assert image.shape == (13000, 14000, 3)
    assert image_format(str(big)) == "png", "the job's second look at the header obeys no pixel limit"
    del image
    with pytest.raises(ImageDecodeError, match="exceeds max_pixels=100000000"):
        load_image(str(big), max_pixels=100_000_000)
    assert Image.MAX_IMAGE_PIXELS == 89478485, "Pillow's own limit is restored after the open"
