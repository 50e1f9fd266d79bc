"""Test media helpers: the real videos carried in ``tests/data/videos`` (see its README), and synthetic
clips made with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

VIDEOS = Path(__file__).resolve().parent / "data" / "videos"
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
]


def video(name: str) -> str:
    path = VIDEOS / name
    assert path.exists(), f"test media missing: {path} (see tests/data/README.md)"
    return str(path)


def write_clip(path: Path, num_frames: int, fps: int, size: tuple[int, int] = (64, 48)) -> Path:
    """An H.264 clip whose frame i has constant timestamp i/fps and a grey level encoding i."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(4 * fps)}
        for index in range(num_frames):
            level = (index * 37) % 256
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def pyav_frames(path: str) -> list[np.ndarray]:
    """Every frame of the best video stream as decoded by PyAV (no rotation applied), in presentation order."""
    with av.open(path) as container:
        stream = container.streams.best("video")
        frames = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    return [pixels for _, pixels in sorted(frames, key=lambda pair: pair[0])]
