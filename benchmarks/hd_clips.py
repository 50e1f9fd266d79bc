"""Realistic benchmark inputs: 60-s H.264 clips as a phone or a web site delivers them, made with PyAV.

A clip is a real frame of ``tests/data/videos`` enlarged and slowly panned and zoomed over, a second real
frame moving across it (local motion), mild temporal grain on the luma, and a small burned-in block in the
top centre that carries the frame number in the 4x4 cell code `tests/media.py: frame_number` reads
(`read_number`; it survives the job's 336-px centre crop). H.264 (libx264, preset superfast: CABAC,
deblocking, B-frames, b-pyramid normal as x264 defaults), yuv420p, 30 fps, a key frame every ``gop_s`` s
exactly (g = keyint_min, no scene-cut key frames), average bitrate 6 Mbit/s at 1080p (scaled by the pixel
count: 2.7 Mbit/s at 720p) with a VBV cap, as streaming encoders and phones rate-control.

Clips are cached: the file name spells every parameter (`clip_name`), and a file made once is re-used.
Making one takes about 65-75 s at 1080p and 25-30 s at 720p on 2 cores.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from media import frame_number  # noqa: E402

VIDEOS = ROOT / "tests" / "data" / "videos"
# variant -> (background frame's clip, moving foreground frame's clip)
VARIANTS = (("video_0.mov", "flipping_a_pancake.mkv"),
            ("flipping_a_pancake.mkv", "nasa_13013.mp4"),
            ("nasa_13013.mp4", "video_0.mov"))
PRESET = "superfast"  # the fastest x264 preset that keeps CABAC, deblocking and B-frames
BITRATE_1080P = 6_000_000  # bit/s at 1920x1080, scaled by pixel count for other sizes
CONTENT = "c1"  # bump when the pictures change, so cached clips are not re-used
GRAIN = 3  # luma grain amplitude (levels, uniform in [-GRAIN, GRAIN])
CELL = 0.0389  # code cell side / picture height (42 px at 1080p, 28 px at 720p)
TOP = 0.05  # code block top / picture height


def bitrate(width: int, height: int) -> int:
    """Average bitrate (bit/s) of a clip of this size."""
    return int(round(BITRATE_1080P * width * height / (1920 * 1080), -3))


def clip_name(width: int, height: int, seconds: int, fps: int, gop_s: int, variant: int) -> str:
    """The cache file name: every parameter that changes the clip."""
    return (f"hd_{width}x{height}_{seconds}s_{fps}fps_gop{gop_s}s_x264-{PRESET}-bf3_"
            f"{bitrate(width, height) // 1000}k_{CONTENT}_v{variant}.mp4")


def make_clip(folder: Path, width: int, height: int, seconds: int = 60, fps: int = 30, gop_s: int = 5,
              variant: int = 0) -> Path:
    """The clip with these parameters in ``folder`` (made there first unless it exists); ``variant``
    (0..2) picks the real frames and the motion, so clips of one size differ. ``width`` must be even,
    ``height`` a multiple of 4, and the clip at most 32767 frames (the code's 15 bits)."""
    if width % 2 or height % 4 or seconds * fps > 32767:
        raise ValueError(f"cannot make {width}x{height}, {seconds * fps} frames: see make_clip's docstring")
    path = Path(folder) / clip_name(width, height, seconds, fps, gop_s, variant)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("partial-" + path.name)  # renamed when complete: an interrupted run leaves no clip
    rate = bitrate(width, height)
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": PRESET, "bf": "3", "g": str(gop_s * fps), "keyint_min": str(gop_s * fps),
                          "sc_threshold": "0", "b": str(rate), "maxrate": str(rate * 4 // 3), "bufsize": str(rate * 2)}
        for frame in _pictures(width, height, seconds * fps, variant):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    os.replace(partial, path)
    return path


def read_number(picture: np.ndarray) -> int:
    """The frame number a clip's picture carries: ``picture [h, w, 3]`` uint8 RGB, the clip's frame scaled
    to height h (aspect kept) and possibly cropped about its centre horizontally (the job's square crop)."""
    height, width = picture.shape[:2]
    side = 4 * CELL * height
    top, left = round(TOP * height), round((width - side) / 2)
    return frame_number(np.ascontiguousarray(picture[top:top + round(side), left:left + round(side)]))


def _yuv420p(picture: np.ndarray | av.VideoFrame, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``picture [H, W, 3]`` uint8 RGB (or an `av.VideoFrame`) scaled to ``width`` x ``height`` (width even,
    height a multiple of 4): its Y, U, V planes (U and V at half size)."""
    frame = picture if isinstance(picture, av.VideoFrame) else av.VideoFrame.from_ndarray(picture, format="rgb24")
    planes = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC").to_ndarray()
    chroma = (height // 2, width // 2)
    return (planes[:height], planes[height:height * 5 // 4].reshape(chroma),
            planes[height * 5 // 4:].reshape(chroma))


def _first_frame(name: str) -> av.VideoFrame:
    with av.open(str(VIDEOS / name)) as container:
        return next(container.decode(video=0))


def _even(value: float, multiple: int = 2) -> int:
    return int(value) // multiple * multiple


def _pictures(width: int, height: int, count: int, variant: int) -> Iterator[av.VideoFrame]:
    """The clip's frames (yuv420p `av.VideoFrame`), one by one."""
    background, foreground = VARIANTS[variant]
    base = _yuv420p(_first_frame(background), _even(1.3 * width, 4), _even(1.3 * height, 4))  # room to pan and zoom
    fg_height = _even(0.35 * height, 4)
    fg_frame = _first_frame(foreground)
    fg = _yuv420p(fg_frame, _even(fg_height * fg_frame.width / fg_frame.height), fg_height)
    rng = np.random.default_rng(variant)
    grain = rng.integers(-GRAIN, GRAIN + 1, size=(4, height + 64, width + 64), dtype=np.int8).view(np.uint8)
    cell, top = _even(CELL * height), _even(TOP * height)
    left = _even((width - 4 * cell) / 2)
    colours = {name: _yuv420p(np.full((4, 4, 3), rgb, np.uint8), 4, 4)
               for name, rgb in (("red", (255, 0, 0)), ("white", (255, 255, 255)), ("black", (0, 0, 0)))}
    phase = 1.7 * variant
    for index in range(count):
        # window over the background: zoom between 1.0x and 1.25x the output, panning on a slow Lissajous path
        zoom = 1.0 + 0.125 * (1 + math.sin(phase + index / 97))
        win_w, win_h = _even(width * zoom, 4), _even(height * zoom, 4)
        x = _even((base[0].shape[1] - win_w) * (0.5 + 0.5 * math.sin(phase + index / 71)))
        y = _even((base[0].shape[0] - win_h) * (0.5 + 0.5 * math.cos(phase + index / 113)))
        window = np.concatenate([base[0][y:y + win_h, x:x + win_w],
                                 base[1][y // 2:(y + win_h) // 2, x // 2:(x + win_w) // 2].reshape(-1, win_w),
                                 base[2][y // 2:(y + win_h) // 2, x // 2:(x + win_w) // 2].reshape(-1, win_w)])
        planes = _yuv420p(av.VideoFrame.from_ndarray(window, format="yuv420p"), width, height)
        fx = _even((width - fg[0].shape[1]) * (0.5 + 0.5 * math.sin(phase + index / 23)))
        fy = _even((height - fg_height) * (0.5 + 0.5 * math.cos(phase + index / 37)))
        for plane, patch, scale in zip(planes, fg, (1, 2, 2)):
            plane[fy // scale:fy // scale + patch.shape[0], fx // scale:fx // scale + patch.shape[1]] = patch
        luma = planes[0]
        np.clip(luma, GRAIN, 255 - GRAIN, out=luma)
        dx, dy = index * 13 % 64, index * 7 % 64
        luma += grain[index % 4, dy:dy + height, dx:dx + width]  # wraps modulo 256 as signed: never overflows
        for code_cell in range(16):
            row, col = divmod(code_cell, 4)
            colour = "red" if code_cell == 0 else "white" if index >> (code_cell - 1) & 1 else "black"
            for plane, value, scale in zip(planes, colours[colour], (1, 2, 2)):
                cy, cx, side = (top + row * cell) // scale, (left + col * cell) // scale, cell // scale
                plane[cy:cy + side, cx:cx + side] = value[0, 0]
        yield av.VideoFrame.from_ndarray(np.concatenate([planes[0], planes[1].reshape(-1, width),
                                                         planes[2].reshape(-1, width)]), format="yuv420p")
