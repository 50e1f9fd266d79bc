"""Torch preprocessing against the model's own image processor (PIL-backed), on real frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from operators.preprocess import Preprocessing
from operators.towers import describe_tower
from media import decode_frame, video, video_info

FRAMES = ["flipping_a_pancake.mkv", "bt709_full_range.mp4", "video_90.mov", "h265_video.mp4", "nasa_13013.mp4"]
PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's pad-to-square, verbatim in behaviour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def processor_pixels(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(PROCESSOR(images=Image.fromarray(frame), return_tensors="np")["pixel_values"])


def first_frame(name: str, size=None) -> np.ndarray:
    return decode_frame(video(name), 0, size)[None]


@pytest.mark.parametrize("name", FRAMES)
def test_crop_mode_matches_clip_image_processor(name):
    info = video_info(video(name))
    full = first_frame(name)
    expected = processor_pixels(full[0])
    crop = Preprocessing(mode="crop")

    from_full = crop(full)  # resized here, from the full-resolution frame
    assert from_full.shape == (1, 3, 336, 336) and from_full.dtype == torch.float32
    # In normalised units (1.0 ~ 69 grey levels): same resize kernel family, uint8 rounding as PIL.
    assert (from_full - expected).abs().mean() < 0.003 and (from_full - expected).abs().max() < 0.3

    from_decoder = crop(first_frame(name, size=crop.decode_size(info.width, info.height)))
    # ffmpeg's bicubic scaler instead of PIL's: ~1.5 grey levels on average.
    assert (from_decoder - expected).abs().mean() < 0.03


@pytest.mark.parametrize("name", FRAMES)
def test_pad_mode_matches_llava_expand2square(name):
    info = video_info(video(name))
    full = first_frame(name)
    fill = tuple(int(255 * m) for m in PROCESSOR.image_mean)
    expected = torch.from_numpy(
        PROCESSOR(images=expand2square(Image.fromarray(full[0]), fill), return_tensors="np")["pixel_values"]
    )
    pad = Preprocessing(mode="pad")
    for frames in (full, first_frame(name, size=pad.decode_size(info.width, info.height))):
        ours = pad(frames)
        # resize-then-pad vs pad-then-resize differ only along the picture's edge rows
        assert (ours - expected).abs().mean() < 0.05


def test_decode_sizes():
    crop, pad = Preprocessing(mode="crop"), Preprocessing(mode="pad")
    assert crop.decode_size(426, 240) == (596, 336)
    assert crop.decode_size(320, 568) == (336, 596)
    assert pad.decode_size(426, 240) == (336, 189)
    assert pad.decode_size(128, 128) == (336, 336)
    assert Preprocessing(mode="squash", image_size=384).decode_size(426, 240) == (384, 384)
    dinov2 = Preprocessing(mode="crop", image_size=224, resize_size=256)
    assert dinov2.decode_size(426, 240) == (454, 256)


@pytest.mark.parametrize("family,processor,message", [
    ("dinov2", {"do_center_crop": False, "size": {"shortest_edge": 256}}, "not one the job reproduces"),
    ("clip", {"do_center_crop": False, "size": {"shortest_edge": 336}}, "not one the job reproduces"),
    ("vit", {"size": {"longest_edge": 224}}, "not one the job reproduces"),
    ("vit", {"size": {"height": 224, "width": 448}}, "not one the job reproduces"),
    ("clip", {"do_center_crop": True, "size": {"height": 336, "width": 336}, "crop_size": 336},
     "not one the job reproduces"),
    ("siglip", {"size": {"height": 224, "width": 224}}, "makes 224-px images but its position embeddings are for 384"),
])
def test_processor_rules_the_job_does_not_reproduce_are_refused(tower_dirs, tmp_path, family, processor, message):
    """Never a silent square resize for a rule that keeps the aspect ratio, never a size the tower cannot take."""
    import json
    import shutil

    folder = tmp_path / family
    shutil.copytree(tower_dirs[family], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ValueError, match=message):
        describe_tower(str(folder))


def test_processor_values_in_their_other_forms(tower_dirs, tmp_path):
    """One mean/std value for all channels, a legacy int size (a square resize without a crop)."""
    import json
    import shutil

    folder = tmp_path / "vit"
    shutil.copytree(tower_dirs["vit"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 224, "image_mean": 0.5, "image_std": 0.25}))
    preprocessing = describe_tower(str(folder)).preprocessing
    assert (preprocessing.mode, preprocessing.image_size) == ("squash", 224)
    assert preprocessing.mean == (0.5, 0.5, 0.5) and preprocessing.std == (0.25, 0.25, 0.25)


# Mean |difference| in normalised units: the same bicubic kernel as PIL's with uint8 rounding, except ViT's
# processor, which resizes bilinear (the job always resizes bicubic: a departure, measured here).
PROCESSOR_GAP = {"clip": 0.003, "siglip": 0.003, "dinov2": 0.003, "vit": 0.02}


@pytest.mark.parametrize("family", sorted(PROCESSOR_GAP))
@pytest.mark.parametrize("name", FRAMES[:3])
def test_each_towers_own_rule_matches_its_image_processor(tower_dirs, family, name):
    """The size, resize rule and mean/std read from a checkpoint's preprocessor_config.json give what the image
    processor transformers builds from that file gives (its PIL-backed class)."""
    processor = AutoImageProcessor.from_pretrained(tower_dirs[family])
    full = first_frame(name)
    expected = torch.from_numpy(processor(images=Image.fromarray(full[0]), return_tensors="np")["pixel_values"])
    ours = describe_tower(str(tower_dirs[family])).preprocessing(full)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < PROCESSOR_GAP[family]


def test_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match="uint8"):
        Preprocessing()(np.zeros((1, 10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="mode"):
        Preprocessing(mode="stretch")
    with pytest.raises(ValueError, match="cannot crop 336 px"):
        Preprocessing(mode="crop", image_size=336, resize_size=300)
