"""Draw what PruMerge kept for one video: sampled frames with kept patches outlined and pruned
(merged-away) patches shaded, AnyRes tiles stitched beside the global view, and tokens per frame
over time. Frames are re-read with the pipeline's own decode stage, so they are the exact pixels the
encoder saw (same decoder, same resize, crop or pad, same tiles)."""

from __future__ import annotations

import numpy as np
from einops import rearrange, repeat
from PIL import Image, ImageDraw

from operators.frames import frame_rows
from operators.preprocess import Preprocessing
from pipeline.config import EncodeConfig
from pipeline.dataset import select_frames
from pipeline.inputs import filesystem_and_path, local_file
from pipeline.reader import Frame, TokenReader, VideoTokens
from pipeline.stages import frame_request

CAPTION = 16  # px of text above each frame cell
GAP = 8  # px between the global view and the stitched tiles
PLOT_HEIGHT = 200
MIN_WIDTH = 512
COLUMNS = 4
PRUNED_SHADE = (0.35, 0.40, 0.60)  # RGB factors for pruned patches (a dark blue tint)
KEPT_OUTLINE = (255, 220, 0)


def highlight(view: np.ndarray, positions: np.ndarray, grid: tuple[int, int], patch: int | None = None) -> np.ndarray:
    """``view [S, S, 3]`` uint8 with the patches (``patch`` px square; default ``S // grid``) in ``positions``
    outlined and every other patch shaded. Pixels past the last whole patch (SigLIP so400m: 384 px = 27 patches
    of 14 + 6 px the tower never sees) are shaded."""
    rows, cols = grid
    patch_h, patch_w = (patch, patch) if patch else (view.shape[0] // rows, view.shape[1] // cols)
    kept = np.zeros(rows * cols, dtype=bool)
    kept[positions[positions >= 0]] = True
    kept = repeat(kept.reshape(rows, cols), "gh gw -> (gh ph) (gw pw)", ph=patch_h, pw=patch_w)
    kept = np.pad(kept, ((0, view.shape[0] - kept.shape[0]), (0, view.shape[1] - kept.shape[1])))  # [S, S]
    y, x = np.indices(kept.shape)
    line = max(1, patch_h // 7)  # 2 px for 14 px patches: still visible after scaling the panel down
    border = (y % patch_h < line) | (y % patch_h >= patch_h - line) | (x % patch_w < line) | (x % patch_w >= patch_w - line)
    out = np.where(kept[..., None], view, (view * np.array(PRUNED_SHADE)).astype(np.uint8))
    out[kept & border] = KEPT_OUTLINE
    return out


def source_views(video: VideoTokens, metadata: dict) -> list[np.ndarray]:
    """The ``[T, S, S, 3]`` uint8 views the encoder saw for each frame of ``video`` (global view first).

    The media kind and the preprocessing come from the shards' run metadata."""
    recorded = metadata["preprocessing"]
    config = EncodeConfig(media=metadata["media"], anyres=recorded["anyres"], pinpoints=recorded["pinpoints"])
    with local_file(*filesystem_and_path(video.source_path)) as path:
        wanted = [frame.frame_index for frame in video.frames]
        request = frame_request(config, Preprocessing.from_metadata(recorded), path, frames=wanted)
        rows = list(frame_rows(request))
    frames = [row for row in rows if row["kind"] == "frame"]
    if len(frames) != len(wanted):
        failed = next((row for row in rows if row["kind"] == "error"), {"error_type": "?", "error_message": "?"})
        raise RuntimeError(f"cannot re-read {video.source_path}: {failed['error_type']}: {failed['error_message']}")
    return [row["pixels"] for row in frames]


def frame_cell(frame: Frame, views: np.ndarray, grid: tuple[int, int], patch: int, panel: int) -> Image.Image:
    """The global view (``panel`` px square) and, when tiled, the tiles stitched on their grid."""
    cell = Image.fromarray(highlight(views[0], frame.positions.numpy(), grid, patch)).resize((panel, panel),
                                                                                            Image.BICUBIC)
    if not frame.tiles:
        return cell
    tiles = np.stack([highlight(v, t.positions.numpy(), grid, patch) for v, t in zip(views[1:], frame.tiles)])
    stitched = rearrange(tiles, "(r c) h w ch -> (r h) (c w) ch", r=frame.grid_rows, c=frame.grid_cols)
    width = round(panel * frame.grid_cols / frame.grid_rows)
    both = Image.new("RGB", (panel + GAP + width, panel), "white")
    both.paste(cell, (0, 0))
    both.paste(Image.fromarray(stitched).resize((width, panel), Image.BICUBIC), (panel + GAP, 0))
    return both


def tokens_plot(video: VideoTokens, shown: set[int], width: int, height: int = PLOT_HEIGHT) -> Image.Image:
    """Tokens per frame (all views) against time; the frames drawn above are marked with dots."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 28, height - 24
    times = video.timestamps_s.numpy()
    counts = np.array([frame.num_tokens for frame in video.frames])
    t0, t1 = float(times.min()), float(times.max())
    top_count = max(1, int(counts.max()))
    xs = left + (times - t0) / ((t1 - t0) or 1.0) * (right - left)
    ys = bottom - counts / top_count * (bottom - top)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text((4, top - 6), f"{top_count}", fill="black")
    draw.text((4, bottom - 6), "0", fill="black")
    draw.text((left, bottom + 6), f"{t0:.2f} s", fill="black")
    draw.text((right - 50, bottom + 6), f"{t1:.2f} s", fill="black")
    draw.text((left, 4), "tokens per frame over time; above: kept patches outlined, pruned (merged) patches shaded",
              fill="black")
    if len(xs) > 1:
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 90, 200), width=2)
    for frame, x, y in zip(video.frames, xs, ys):
        radius = 4 if frame.frame_index in shown else 2
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(200, 40, 40) if radius == 4 else (30, 90, 200))
    return image


def render_video(reader: TokenReader, video_id: str, path: str, max_frames: int = 8, panel: int = 256) -> Image.Image:
    """Write the PNG for ``video_id`` to ``path`` (up to ``max_frames`` frames, uniformly) and return it."""
    video = reader.load(video_id)
    shown = select_frames(video, max_frames)
    grid, patch = tuple(reader.metadata["patch_grid"]), reader.metadata["patch_size"]
    cells = [frame_cell(frame, views, grid, patch, panel)
             for frame, views in zip(shown.frames, source_views(shown, reader.metadata))]
    columns = min(COLUMNS, len(cells))
    rows = -(-len(cells) // columns)
    cell_width = max(cell.width for cell in cells)
    width = max(MIN_WIDTH, columns * cell_width)
    figure = Image.new("RGB", (width, rows * (CAPTION + panel) + PLOT_HEIGHT), "white")
    draw = ImageDraw.Draw(figure)
    for i, (cell, frame) in enumerate(zip(cells, shown.frames)):
        x, y = (i % columns) * cell_width, (i // columns) * (CAPTION + panel)
        draw.text((x + 2, y + 2), f"frame {frame.frame_index}  t={frame.timestamp_s:.2f}s  {frame.num_tokens} tokens",
                  fill="black")
        figure.paste(cell, (x, y + CAPTION))
    figure.paste(tokens_plot(video, {f.frame_index for f in shown.frames}, width), (0, rows * (CAPTION + panel)))
    figure.save(path, format="PNG")
    return figure
