"""Draw what a reduction kept for one video: sampled frames with kept patches outlined and pruned
(merged-away) patches shaded, AnyRes tiles stitched beside the global view, and tokens per frame
over time. Frames are re-read with the pipeline's own decode stage, so they are the exact pixels the
encoder saw (same decoder, same resize, crop or pad, same tiles).

Temporal outputs (``holitom``: a row is a window of source frames): the picture draws source frames,
not rows, chosen uniformly over all the frames the windows cover. On each, the patches of the tokens
standing for that frame alone are outlined in `KEPT_OUTLINE`, and those of tokens standing for
several frames (a window's static tokens: one token for the patch on every frame of the window) in
`SPANNING_OUTLINE`, on every frame they stand for; the caption gives the frame's window and what it
holds. The plot below shows, per source frame, the tokens the sequence places with it and the tokens
standing for it, with the windows as grey bands."""

from __future__ import annotations

import numpy as np
from einops import rearrange, repeat
from PIL import Image, ImageDraw

from operators.frames import frame_rows
from operators.methods import TEMPORAL
from operators.preprocess import Preprocessing
from operators.sampling import uniform_indices
from pipeline.config import EncodeConfig
from pipeline.dataset import select_frames
from pipeline.inputs import filesystem_and_path, local_file
from pipeline.reader import Frame, TokenReader, VideoTokens
from pipeline.decoder import frame_request

CAPTION = 16  # px of text above each frame cell
TEMPORAL_CAPTION = 30  # temporal outputs: two lines (the frame, its window)
GAP = 8  # px between the global view and the stitched tiles
PLOT_HEIGHT = 200
MIN_WIDTH = 512
COLUMNS = 4
PRUNED_SHADE = (0.35, 0.40, 0.60)  # RGB factors for pruned patches (a dark blue tint)
KEPT_OUTLINE = (255, 220, 0)
SPANNING_OUTLINE = (255, 40, 200)  # temporal outputs: a token standing for several frames (a static token)
WINDOW_BAND = (228, 228, 228)  # temporal outputs' plot: the time span of a window of several frames
SITS_LINE = (30, 90, 200)


def highlight(view: np.ndarray, positions: np.ndarray, grid: tuple[int, int], patch: int | None = None,
              spanning: np.ndarray | None = None) -> np.ndarray:
    """``view [S, S, 3]`` uint8 with the patches (``patch`` px square; default ``S // grid``) in ``positions``
    outlined in `KEPT_OUTLINE`, those in ``spanning`` (temporal tokens standing for several frames) in
    `SPANNING_OUTLINE`, and every other patch shaded. Pixels past the last whole patch (SigLIP so400m: 384 px =
    27 patches of 14 + 6 px the tower never sees) are shaded."""
    rows, cols = grid
    patch_h, patch_w = (patch, patch) if patch else (view.shape[0] // rows, view.shape[1] // cols)

    def pixels_of(selected: np.ndarray | None) -> np.ndarray:  # [S, S] bool: the pixels of those patches
        mask = np.zeros(rows * cols, dtype=bool)
        if selected is not None:
            mask[selected[selected >= 0]] = True
        mask = repeat(mask.reshape(rows, cols), "gh gw -> (gh ph) (gw pw)", ph=patch_h, pw=patch_w)
        return np.pad(mask, ((0, view.shape[0] - mask.shape[0]), (0, view.shape[1] - mask.shape[1])))

    own, span = pixels_of(positions), pixels_of(spanning)
    kept = own | span
    y, x = np.indices(kept.shape)
    line = max(1, patch_h // 7)  # 2 px for 14 px patches: still visible after scaling the panel down
    border = (y % patch_h < line) | (y % patch_h >= patch_h - line) | (x % patch_w < line) | (x % patch_w >= patch_w - line)
    out = np.where(kept[..., None], view, (view * np.array(PRUNED_SHADE)).astype(np.uint8))
    out[span & border] = SPANNING_OUTLINE
    out[own & border] = KEPT_OUTLINE
    return out


def source_views(video: VideoTokens, metadata: dict) -> list[np.ndarray]:
    """The ``[T, S, S, 3]`` uint8 views the encoder saw for each frame of ``video`` (global view first).

    The media kind and the preprocessing come from the shards' run metadata."""
    return read_views(video.source_path, metadata, [frame.frame_index for frame in video.frames])


def read_views(source_path: str, metadata: dict, wanted: list[int]) -> list[np.ndarray]:
    """The ``[T, S, S, 3]`` uint8 views the encoder saw for the source frames ``wanted`` of ``source_path``,
    re-read with the pipeline's decode stage under the run's recorded media kind and preprocessing."""
    recorded = metadata["preprocessing"]
    config = EncodeConfig(media=metadata["media"], anyres=recorded["anyres"], pinpoints=recorded["pinpoints"])
    with local_file(*filesystem_and_path(source_path)) as path:
        request = frame_request(config, Preprocessing.from_metadata(recorded), path, frames=wanted)
        rows = list(frame_rows(request))
    frames = [row for row in rows if row["kind"] == "frame"]
    if len(frames) != len(wanted):
        failed = next((row for row in rows if row["kind"] == "error"), {"error_type": "?", "error_message": "?"})
        raise RuntimeError(f"cannot re-read {source_path}: {failed['error_type']}: {failed['error_message']}")
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


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], times: tuple[float, float], top_count: int,
          captions: list[str]) -> None:
    """A plot's axes in ``box`` (left, top, right, bottom): counts 0..``top_count`` up, ``times`` (s) across,
    and a caption line per entry above."""
    left, top, right, bottom = box
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.text((4, top - 6), f"{top_count}", fill="black")
    draw.text((4, bottom - 6), "0", fill="black")
    draw.text((left, bottom + 6), f"{times[0]:.2f} s", fill="black")
    draw.text((right - 50, bottom + 6), f"{times[1]:.2f} s", fill="black")
    for line, caption in enumerate(captions):
        draw.text((left, 4 + 13 * line), caption, fill="black")


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
    _axes(draw, (left, top, right, bottom), (t0, t1), top_count,
          ["tokens per frame over time; above: kept patches outlined, pruned (merged) patches shaded"])
    if len(xs) > 1:
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 90, 200), width=2)
    for frame, x, y in zip(video.frames, xs, ys):
        radius = 4 if frame.frame_index in shown else 2
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(200, 40, 40) if radius == 4 else (30, 90, 200))
    return image


def render_video(reader: TokenReader, video_id: str, path: str, max_frames: int = 8, panel: int = 256) -> Image.Image:
    """Write the PNG for ``video_id`` to ``path`` (up to ``max_frames`` frames, uniformly) and return it.
    Temporal outputs: up to ``max_frames`` source frames, uniformly over all the frames the windows cover."""
    video = reader.load(video_id)
    if is_temporal(video):
        return render_temporal(video, path, max_frames, panel)
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


# -- temporal outputs -----------------------------------------------------------------------------


def is_temporal(video: VideoTokens) -> bool:
    """Whether ``video`` comes from a temporal method (its rows are windows), by its metadata or its rows."""
    return video.metadata.get("method") in TEMPORAL or any(len(f.frame_indices) > 1 for f in video.frames)


def source_frames(video: VideoTokens) -> list[tuple[Frame, int, float]]:
    """(row, source frame number, time) of every source frame ``video``'s rows cover, in time order."""
    return [(frame, number, time) for frame in video.frames
            for number, time in zip(frame.frame_indices, frame.timestamps)]


def tokens_for(frame: Frame, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(own, spanning): positions of the tokens of row ``frame`` standing for source frame ``number``: for it
    alone, and for several frames including it (a window's static tokens)."""
    view = frame.global_view
    first, last, positions = view.first_frames.numpy(), view.last_frames.numpy(), view.positions.numpy()
    covers = (first <= number) & (number <= last)
    alone = first == last
    return positions[covers & alone], positions[covers & ~alone]


def window_cell(frame: Frame, number: int, pixels: np.ndarray, grid: tuple[int, int], patch: int,
                panel: int) -> Image.Image:
    """Source frame ``number`` of row ``frame`` (its global view, ``panel`` px square), its tokens outlined."""
    own, spanning = tokens_for(frame, number)
    return Image.fromarray(highlight(pixels, own, grid, patch, spanning)).resize((panel, panel), Image.BICUBIC)


def window_caption(frame: Frame, number: int, time: float) -> tuple[str, str]:
    """Two caption lines: the frame and its own tokens (standing for it alone); its window (first-last frame
    number) and the tokens spanning several of its frames that stand for this one."""
    own, spanning = tokens_for(frame, number)
    first, last = frame.frame_indices[0], frame.frame_indices[-1]
    window = (f"window {first}-{last}  {len(spanning)} spanning" if len(frame.frame_indices) > 1
              else f"window {first} (1 frame)")
    return f"frame {number}  t={time:.2f}s  {len(own)} own", window


def render_temporal(video: VideoTokens, path: str, max_frames: int, panel: int) -> Image.Image:
    """`render_video` for a temporal output: up to ``max_frames`` source frames, each with the tokens that
    stand for it (a window's static tokens outlined on every frame of the window), then the plot."""
    covered = source_frames(video)
    shown = [covered[i] for i in uniform_indices(len(covered), max_frames)]
    grid, patch = tuple(video.metadata["patch_grid"]), video.metadata["patch_size"]
    views = read_views(video.source_path, video.metadata, [number for _, number, _ in shown])
    cells = [window_cell(frame, number, pixels[0], grid, patch, panel)
             for (frame, number, _), pixels in zip(shown, views)]
    columns = min(COLUMNS, len(cells))
    rows = -(-len(cells) // columns)
    width = max(MIN_WIDTH, columns * panel)
    figure = Image.new("RGB", (width, rows * (TEMPORAL_CAPTION + panel) + PLOT_HEIGHT), "white")
    draw = ImageDraw.Draw(figure)
    for i, (cell, (frame, number, time)) in enumerate(zip(cells, shown)):
        x, y = (i % columns) * panel, (i // columns) * (TEMPORAL_CAPTION + panel)
        for line, text in enumerate(window_caption(frame, number, time)):
            draw.text((x + 2, y + 2 + 13 * line), text, fill="black")
        figure.paste(cell, (x, y + TEMPORAL_CAPTION))
    plot = temporal_tokens_plot(video, {number for _, number, _ in shown}, width)
    figure.paste(plot, (0, rows * (TEMPORAL_CAPTION + panel)))
    figure.save(path, format="PNG")
    return figure


def tokens_per_source_frame(video: VideoTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source frame numbers, their times, tokens placed with each (first frame), tokens standing for each)."""
    covered = source_frames(video)
    numbers = np.array([number for _, number, _ in covered], dtype=np.int64)
    times = np.array([time for _, _, time in covered], dtype=np.float64)
    first = np.concatenate([v.first_frames.numpy() for f in video.frames for v in f.views]).astype(np.int64)
    last = np.concatenate([v.last_frames.numpy() for f in video.frames for v in f.views]).astype(np.int64)
    at = np.searchsorted(numbers, first)  # frame numbers increase over the video
    sits = np.bincount(at, minlength=len(numbers))
    spans = np.zeros(len(numbers) + 1, dtype=np.int64)  # +1 at a token's first frame, -1 after its last
    np.add.at(spans, at, 1)
    np.add.at(spans, np.searchsorted(numbers, last) + 1, -1)
    return numbers, times, sits, np.cumsum(spans)[:-1]


def temporal_tokens_plot(video: VideoTokens, shown: set[int], width: int, height: int = PLOT_HEIGHT) -> Image.Image:
    """Per source frame against time: the tokens the sequence places with it (blue: its own and the static
    tokens of a window starting there) and the tokens standing for it (magenta); windows of several frames
    as grey bands; the frames drawn above are marked with dots."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 16, 34, height - 24
    numbers, times, sits, stands = tokens_per_source_frame(video)
    t0, t1 = float(times.min()), float(times.max())
    top_count = max(1, int(max(sits.max(), stands.max())))

    def x_of(t):
        return left + (t - t0) / ((t1 - t0) or 1.0) * (right - left)

    for frame in video.frames:
        if len(frame.frame_indices) > 1:
            span = [x_of(frame.timestamps[0]) - 3, top, x_of(frame.timestamps[-1]) + 3, bottom]
            draw.rectangle(span, fill=WINDOW_BAND)
    xs = x_of(times)
    _axes(draw, (left, top, right, bottom), (t0, t1), top_count,
          ["tokens per source frame: blue placed with it, magenta standing for it; grey: windows",
           "above: own tokens yellow, spanning (static) tokens magenta, pruned patches shaded"])
    for counts, colour in ((stands, SPANNING_OUTLINE), (sits, SITS_LINE)):
        ys = bottom - counts / top_count * (bottom - top)
        if len(xs) > 1:
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        if colour == SITS_LINE:
            for number, x, y in zip(numbers.tolist(), xs, ys):
                radius = 4 if number in shown else 2
                draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                             fill=(200, 40, 40) if radius == 4 else SITS_LINE)
    return image
