"""Test media helpers: the real videos carried in ``tests/data/videos`` (see its README), and synthetic
clips made with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

DATA = Path(__file__).resolve().parent / "data"
VIDEOS = DATA / "videos"
HOSTILE_VIDEOS = DATA / "hostile-videos"
HOSTILE_IMAGES = DATA / "hostile-images"
DECODABLE = [
    "flipping_a_pancake.mkv",
    "nasa_13013.mp4",
    "bt709_full_range.mp4",
    "video_0.mov",
    "video_90.mov",
    "video_180.mov",
    "video_270.mov",
    "unordered.mov",
    "h264_10bits.mp4",
    "h265_10bits.mp4",
    "h265_video.mp4",
    "av1_video.mkv",
]


def video(name: str) -> str:
    path = VIDEOS / name
    assert path.exists(), f"test media missing: {path} (see tests/data/README.md)"
    return str(path)


def hostile(name: str) -> str:
    """A file of `tests/data/hostile-videos` or `hostile-images` (see their READMEs)."""
    for folder in (HOSTILE_VIDEOS, HOSTILE_IMAGES):
        if (folder / name).exists():
            return str(folder / name)
    raise AssertionError(f"test media missing: {name} (see tests/data/README.md)")


def frame_number(pixels: np.ndarray) -> int:
    """The frame number a hostile clip draws into each picture (``[H, W, 3]`` uint8 RGB, upright).

    A 4x4 grid of cells: cell 0 pure red marks the top-left corner, cell c (1..15) is white when bit c-1
    of the number is set. Each cell is read by the mean of its central pixels.
    Raises AssertionError when the red cell is not top-left (a sideways or upside-down picture)."""
    height, width = pixels.shape[:2]
    cells = []
    for cell in range(16):
        row, col = divmod(cell, 4)
        centre = pixels[int((row + 0.3) * height / 4):int((row + 0.7) * height / 4),
                        int((col + 0.3) * width / 4):int((col + 0.7) * width / 4)]
        cells.append(centre.reshape(-1, 3).mean(axis=0))
    red, green, blue = cells[0]
    assert red > 180 and green < 80 and blue < 80, f"cell 0 is not red {cells[0].round()}: the picture is not upright"
    return sum(1 << (cell - 1) for cell in range(1, 16) if cells[cell].mean() > 128)


def decode_frame(path: str, index: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """Presented frame ``index`` of ``path``, upright, ``[H, W, 3]`` uint8, decoded at ``size`` (w, h) if given."""
    from operators.decode import DecodedFrame, VideoReader

    with VideoReader(path) as reader:
        frame = next(reader.frames(np.array([index]), (lambda w, h: size) if size else None))
    assert isinstance(frame, DecodedFrame), frame
    return frame.pixels


def video_info(path: str):
    """`operators.decode.VideoInfo` of ``path``."""
    from operators.decode import VideoReader

    with VideoReader(path) as reader:
        return reader.info


def numbered_picture(number: int, width: int = 320, height: int = 240) -> np.ndarray:
    """``[height, width, 3]`` uint8 RGB carrying ``number`` in the hostile clips' 4x4 code (`frame_number`)."""
    picture = np.zeros((height, width, 3), np.uint8)
    for cell in range(16):
        row, col = divmod(cell, 4)
        block = picture[row * height // 4:(row + 1) * height // 4, col * width // 4:(col + 1) * width // 4]
        if cell == 0:
            block[:] = (255, 0, 0)
        elif number >> (cell - 1) & 1:
            block[:] = 255
    return picture


def write_h264(path: Path, pictures, fps: int, options: dict, container_format: str | None = None,
               container_options: dict | None = None, rotation: float | None = None) -> Path:
    """Encode ``pictures`` (``[H, W, 3]`` uint8 RGB, all one size) with libx264 at ``fps``, frame i at i/fps."""
    pictures = iter(pictures)
    first = next(pictures)
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", **options}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for picture in (first, *pictures):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_numbered_clip(path: Path, num_frames: int, fps: int = 25, container_format: str | None = None,
                        options: dict | None = None, first_number: int = 0, rotation: float | None = None,
                        container_options: dict | None = None) -> Path:
    """An H.264 clip (B-frames unless ``options`` say otherwise) whose frame i shows ``first_number + i``."""
    pictures = (numbered_picture(first_number + index) for index in range(num_frames))
    return write_h264(path, pictures, fps, {"bf": "2", "g": str(2 * fps), **(options or {})}, container_format,
                      container_options, rotation)


def write_clip(path: Path, num_frames: int, fps: int, size: tuple[int, int] = (64, 48)) -> Path:
    """An H.264 clip whose frame i has constant timestamp i/fps and a grey level encoding i."""
    width, height = size
    pictures = (np.full((height, width, 3), (index * 37) % 256, np.uint8) for index in range(num_frames))
    return write_h264(path, pictures, fps, {"g": str(4 * fps)})


def pyav_frames(path: str) -> list[np.ndarray]:
    """Every frame of the best video stream as decoded by PyAV (no rotation applied), in presentation order."""
    with av.open(path) as container:
        stream = container.streams.best("video")
        frames = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    return [pixels for _, pixels in sorted(frames, key=lambda pair: pair[0])]
