"""Does the job's token selection follow real image content? A real trained ViT against random weights of its shape.

The project's first evidence on a trained tower. The real tower is the ViT-Ti/16 ImageNet classifier read from
``../shared/models/vit-tiny-patch16-224`` (224 px, 16-px patches: 196 patches per frame, CLS token; see its
README). It is only read from there, never copied into the repository, and this script writes nothing into the
repository: everything goes to ``--work``. The random tower is ``ViTModel(ViTConfig.from_pretrained(model))``
with ``torch.manual_seed(0)``, saved to ``--work``; neither checkpoint has a ``preprocessor_config.json``, so both
get the ViT family's defaults (squash to 224 px, mean = std = 0.5) and see exactly the same pixels.

Measured, per clip of ``--videos`` (the tests' real clips by default), ``--num-frames`` frames each:

* kept patches per frame: the real job (`pipeline.run.run`, an embedded Ray) run with ``--method prumerge`` and
  ``prumerge+`` (importance ``cls``: the CLS query's full-width attention in the block after layer -2) for each
  tower, read back with `pipeline.reader.TokenReader`; mean (min-max) over frames of the positions >= 0 (the
  merged extra token, -1, not counted).
* CLS-attention sparsity: the same importance computed directly with `operators.encode.VisionEncoder` on the
  frames the job decodes (`operators.frames.frame_rows` with the job's request). Per frame: the share of
  patches above Q3 + 1.5·IQR (what PruMerge keeps), the share of the patches' attention held by the top 10
  patches, and the share on the four corner patches; the mean over frames.

Read: with random weights the attention is nearly uniform (top-10 share near 10/196 = 5 %, corners near 4/196 =
2 %), so a frame has few or no IQR outliers and PruMerge keeps almost nothing (often only the merged extra
token; PruMerge+ adds no samples to an empty set). With the trained tower a few patches carry most of the
attention and PruMerge keeps a content-dependent set (tens of patches). The corner share is how much of the
attention goes to the four corner patches (the high-norm "artifact" tokens trained ViTs grow) rather than to the
scene. The model README's figures (~11 % outliers, top-10 55-59 %, corners ~39 %) are for the per-head mean
(``--importance cls_head_mean``); the job's default ``cls`` score, measured here, is one full-width softmax and
much sharper: its top-10 and corner shares are far higher.

The "PruMerge kept = outliers" lines check that the job's kept counts equal the outlier counts computed here (the
same rule on the same scores). The kept tokens of one clip (real tower, PruMerge) are drawn with
`pipeline.render.render_video` (what ``jobs/inspect_shards.py --png`` draws) to ``--png``.

    python benchmarks/real_tower_report.py --work /tmp/rtr
    python benchmarks/real_tower_report.py --model DIR --videos DIR --num-frames 4 --png-clip video_0.mov
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.encode import VisionEncoder  # noqa: E402
from operators.frames import frame_rows  # noqa: E402
from operators.towers import describe_tower  # noqa: E402
from pipeline.config import EncodeConfig  # noqa: E402
from pipeline.inputs import filesystem_and_path  # noqa: E402
from pipeline.reader import TokenReader, VideoTokens  # noqa: E402
from pipeline.render import render_video  # noqa: E402
from pipeline.run import run  # noqa: E402
from pipeline.decoder import frame_request  # noqa: E402

MODEL = ROOT.parent / "shared" / "models" / "vit-tiny-patch16-224"
VIDEOS = ROOT / "tests" / "data" / "videos"
TOWERS = ("real", "random")
METHODS = ("prumerge", "prumerge+")
TOP = 10


def save_random_tower(model: Path, directory: Path) -> Path:
    """Save a seeded random-weight `ViTModel` of ``model``'s config to ``directory`` (no processor config)."""
    torch.manual_seed(0)
    ViTModel(ViTConfig.from_pretrained(model)).save_pretrained(directory)
    return directory


def load_videos(output: Path) -> tuple[TokenReader, dict[str, VideoTokens]]:
    """The output's reader and its videos by source file (local path)."""
    reader = TokenReader(str(output))
    videos = [reader.load(video_id) for video_id in reader.video_ids()]
    return reader, {filesystem_and_path(video.source_path)[1]: video for video in videos}


def kept_patches(video: VideoTokens) -> list[int]:
    """Patches kept in each frame of ``video`` (positions >= 0: the merged extra token not counted)."""
    return [int((frame.positions >= 0).sum()) for frame in video.frames]


def frame_importance(model_dir: Path, paths: list[str], num_frames: int) -> tuple[dict[str, np.ndarray], int]:
    """Per clip, the ``[F, N]`` importance the job scores its frames with, and the tower's patch grid side."""
    tower = describe_tower(str(model_dir))
    config = EncodeConfig(input="x", output="y", model=str(model_dir), num_frames=num_frames).for_tower(tower)
    preprocessing = config.preprocessing(tower)
    encoder = VisionEncoder(str(model_dir), device="cpu")
    importance = {}
    for path in paths:
        rows = [row for row in frame_rows(frame_request(config, preprocessing, path)) if row["kind"] == "frame"]
        views = np.stack([row["pixels"][0] for row in rows])  # [F, S, S, 3], the global view of each frame
        importance[path] = encoder(preprocessing.normalize(torch.from_numpy(views))).importance.numpy()
    return importance, tower.grid_size


def frame_measures(importance: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    """Per frame of ``importance [F, N]``: share of patches above Q3 + 1.5·IQR, and the shares of the patches'
    attention held by the top `TOP` patches and by the four corner patches."""
    q1, q3 = np.percentile(importance, [25, 75], axis=1)
    total = importance.sum(axis=1)
    corners = [0, grid - 1, grid * (grid - 1), grid * grid - 1]
    return {
        "outliers": (importance > (q3 + 1.5 * (q3 - q1))[:, None]).mean(axis=1),
        "top": np.sort(importance, axis=1)[:, -TOP:].sum(axis=1) / total,
        "corners": importance[:, corners].sum(axis=1) / total,
    }


def kept_cell(counts: list[int] | None) -> str:
    """``mean (min-max)`` of a clip's kept patches per frame; ``-`` when the clip has no tokens."""
    return "-" if not counts else f"{np.mean(counts):.1f} ({min(counts)}-{max(counts)})"


def percent(values: np.ndarray) -> str:
    """The mean of ``values`` (shares) as a percentage."""
    return f"{100 * np.mean(values):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help=f"the real ViT checkpoint (default {MODEL})")
    parser.add_argument("--videos", type=Path, default=VIDEOS, help=f"clips to encode (default {VIDEOS})")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip, uniform (default 8)")
    parser.add_argument("--work", type=Path, help="folder for the random tower, outputs and PNG (default: a new "
                                                  "temporary folder, kept)")
    parser.add_argument("--png", type=Path, help="kept-token picture (default WORK/kept_tokens.png)")
    parser.add_argument("--png-clip", default="flipping_a_pancake.mkv", help="clip drawn (default %(default)s)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="real_tower_report-"))
    work.mkdir(parents=True, exist_ok=True)
    png = args.png or work / "kept_tokens.png"
    model_dirs = {"real": args.model.resolve(), "random": save_random_tower(args.model, work / "random-tower")}

    outputs: dict[tuple[str, str], tuple[TokenReader, dict[str, VideoTokens]]] = {}
    for tower in TOWERS:
        for method in METHODS:
            output = work / f"{tower}-{method}"
            summary = run(EncodeConfig(input=str(args.videos), output=str(output), model=str(model_dirs[tower]),
                                       num_frames=args.num_frames, method=method))
            print(f"{tower} {method}: {summary.lines()[0]}")
            outputs[tower, method] = load_videos(output)
    kept = {key: {path: kept_patches(video) for path, video in videos.items()} for key, (_, videos) in outputs.items()}

    paths = sorted({path for counts in kept.values() for path in counts}, key=lambda p: Path(p).name)
    measures: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for tower in TOWERS:
        importance, grid = frame_importance(model_dirs[tower], paths, args.num_frames)
        measures[tower] = {path: frame_measures(scores, grid) for path, scores in importance.items()}
    patches = grid * grid

    print(f"\nmodel {model_dirs['real']} vs random weights of its shape; {patches} patches per frame, "
          f"{args.num_frames} frames per clip; kept = mean (min-max) patches per frame, extra token not counted")
    header = (f"{'clip':<24}{'frames':>7}  {'PruMerge real':>15}{'random':>15}  {'PruMerge+ real':>15}{'random':>15}"
              f"  {'outliers real':>13}{'random':>8}  {'top-10 real':>11}{'random':>8}  {'corners real':>12}")
    print(header)
    print("-" * len(header))
    for path in paths:
        real, rand = measures["real"][path], measures["random"][path]
        cells = [kept_cell(kept[tower, method].get(path)) for method in METHODS for tower in TOWERS]
        print(f"{Path(path).name[:24]:<24}{len(real['top']):>7}  {cells[0]:>15}{cells[1]:>15}  {cells[2]:>15}"
              f"{cells[3]:>15}  {percent(real['outliers']):>13}{percent(rand['outliers']):>8}  "
              f"{percent(real['top']):>11}{percent(rand['top']):>8}  {percent(real['corners']):>12}")

    for tower in TOWERS:
        differ = [Path(path).name for path in paths if kept[tower, "prumerge"].get(path, []) !=
                  [round(share * patches) for share in measures[tower][path]["outliers"]]]
        print(f"{tower}: PruMerge kept = outliers computed here in {len(paths) - len(differ)} of {len(paths)} clips"
              + (f" (differ: {', '.join(differ)})" if differ else ""))

    reader, videos = outputs["real", "prumerge"]
    drawn = next((video for path, video in videos.items() if Path(path).name == args.png_clip), None)
    if drawn is None:
        print(f"no picture: {args.png_clip} has no tokens in {work / 'real-prumerge'}")
    else:
        render_video(reader, drawn.video_id, str(png), max_frames=8)
        print(f"kept tokens of {args.png_clip} (real tower, PruMerge): {png}")

    def pooled(tower: str, name: str) -> str:
        return percent(np.concatenate([measures[tower][path][name] for path in paths]))

    def kept_mean(tower: str, method: str) -> str:
        return f"{np.mean([n for counts in kept[tower, method].values() for n in counts]):.1f}"

    frames = sum(len(measures["real"][path]["top"]) for path in paths)
    print(f"\nall clips ({len(paths)} clips, {frames} frames): kept/frame PruMerge real "
          f"{kept_mean('real', 'prumerge')} vs random {kept_mean('random', 'prumerge')}, PruMerge+ real "
          f"{kept_mean('real', 'prumerge+')} vs random {kept_mean('random', 'prumerge+')}; outliers real "
          f"{pooled('real', 'outliers')} vs random {pooled('random', 'outliers')}; top-{TOP} share real "
          f"{pooled('real', 'top')} vs random {pooled('random', 'top')}; corner share real "
          f"{pooled('real', 'corners')} vs random {pooled('random', 'corners')}")


if __name__ == "__main__":
    main()
