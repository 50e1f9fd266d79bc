"""The job with each tower family end to end: the shards hold exactly what the tower and PruMerge give for the
frames the decoder made at the tower's own size and normalisation; the output records the family and the
importance rule; towers never mix in one output; outputs written before towers were recorded stay resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from operators.encode import VisionEncoder
from operators.frames import frame_rows
from operators.prumerge import prumerge
from operators.towers import describe_tower
from pipeline.config import EncodeConfig
from pipeline.reader import TokenReader
from pipeline.render import render_video
from pipeline.outputs import run_metadata
from pipeline.run import RunSetupError, run
from pipeline.schema import METADATA_KEY, differing_settings, read_file_metadata, upgrade_metadata
from pipeline.sequence import llava_sequence
from pipeline.decoder import frame_request
from media import VIDEOS

ROOT = Path(__file__).resolve().parents[1]
CLIP = "flipping_a_pancake.mkv"
EXPECTED = {  # family: (input px, patches per side, default importance, own resize rule)
    "siglip": (384, 27, "probe", "squash"),
    "siglip2": (128, 8, "probe", "squash"),
    "vit": (224, 14, "cls", "squash"),
    "dinov2": (224, 16, "cls", "crop"),
}


def one_video(directory: Path, name: str = CLIP) -> Path:
    directory.mkdir(parents=True)
    (directory / name).symlink_to(VIDEOS / name)
    return directory


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_job_encodes_with_each_tower_family(tmp_path, tower_dirs, ray_local, family):
    size, grid, importance, mode = EXPECTED[family]
    config = EncodeConfig(input=str(one_video(tmp_path / "in")), output=str(tmp_path / "out"),
                          model=str(tower_dirs[family]), num_frames=3, method="prumerge+", k_neighbors=8)
    summary = run(config)
    assert (summary.encoded, summary.frames) == (1, 3)

    reader = TokenReader(str(tmp_path / "out"))
    metadata = reader.metadata
    assert metadata["tower"] == family and metadata["method_params"]["importance"] == importance
    assert metadata["patch_grid"] == [grid, grid] and metadata["hidden_size"] == 32
    assert metadata["preprocessing"]["image_size"] == size and metadata["preprocessing"]["mode"] == mode
    video = reader.load(reader.video_ids()[0])

    # the same frames, decoded and prepared as the job does, through the tower and PruMerge+ here
    tower = describe_tower(str(tower_dirs[family]))
    resolved = config.for_tower(tower)
    rows = [row for row in frame_rows(frame_request(resolved, resolved.preprocessing(tower), str(VIDEOS / CLIP)))
            if row["kind"] == "frame"]
    views = torch.from_numpy(np.concatenate([row["pixels"] for row in rows]))
    assert views.shape == (3, size, size, 3)
    out = VisionEncoder(str(tower_dirs[family]), device="cpu")(tower.preprocessing.normalize(views))
    expected = prumerge(out.features, out.keys, out.importance, mode="prumerge+", k_neighbors=8)
    assert [f.frame_index for f in video.frames] == [row["frame_index"] for row in rows]
    for frame, tokens, positions, scores in zip(video.frames, expected.tokens, expected.positions, expected.scores):
        assert frame.positions.tolist() == positions.tolist()
        assert (frame.positions[:-1] < grid * grid).all()
        torch.testing.assert_close(frame.tokens.float(), tokens.half().float())
        torch.testing.assert_close(frame.scores, scores)

    sequence = llava_sequence(video)  # positions rebuilt on the tower's own grid
    assert len(sequence.tokens) >= video.num_tokens


def test_anyres_tiles_at_the_towers_own_size_and_the_kept_token_picture(tmp_path, tower_dirs, ray_local):
    """SigLIP at 384 px: default pinpoints are llava-v1.6's grids of 384-px tiles; the picture redraws them."""
    run(EncodeConfig(input=str(one_video(tmp_path / "in")), output=str(tmp_path / "out"),
                     model=str(tower_dirs["siglip"]), num_frames=2, anyres=True, importance="mean_received"))
    reader = TokenReader(str(tmp_path / "out"))
    assert reader.metadata["preprocessing"]["pinpoints"] == "384x768,768x384,768x768,1152x384,384x1152"
    assert reader.metadata["method_params"]["importance"] == "mean_received"
    video = reader.load(reader.video_ids()[0])
    frame = video.frames[0]
    assert (frame.grid_rows, frame.grid_cols) == (1, 2)  # 480x270 source fits 768x384 best
    assert len(frame.tiles) == 2
    figure = render_video(reader, video.video_id, str(tmp_path / "kept.png"), max_frames=2, panel=128)
    assert figure.width >= 2 * 128 and (tmp_path / "kept.png").stat().st_size > 0


def test_towers_never_mix_in_one_output(tmp_path, tower_dirs, ray_local):
    inputs = one_video(tmp_path / "in")
    output = tmp_path / "out"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(tower_dirs["clip"]), num_frames=2))
    with pytest.raises(RunSetupError, match="different settings:(.|\n)*  tower: existing 'clip', this run 'siglip'"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tower_dirs["siglip"]), num_frames=2))
    with pytest.raises(RunSetupError, match="method_params: existing .*'cls'.*this run .*'cls_head_mean'"):
        run(EncodeConfig(input=str(inputs), output=str(output), model=str(tower_dirs["clip"]), num_frames=2,
                         importance="cls_head_mean"))


@pytest.mark.parametrize("family,flags,message", [
    ("clip", ["--importance", "probe"], "--importance probe: this clip tower cannot compute it (its checkpoint has "
                                        "no attention-pooling head); use one of cls, cls_head_mean, mean_received"),
    ("siglip", ["--importance", "cls"], "--importance cls: this siglip tower cannot compute it (it has no CLS token)"),
    ("siglip", ["--anyres", "--pinpoints", "336x672"], "--pinpoints 336x672: each side must be a multiple of the "
                                                       "model's input size 384 px"),
    ("dinov2", ["--method", "fixed", "--budget", "257"], "--budget 257: the model has 256 patches per view"),
    ("siglip", ["--layer", "-1"], "--layer -1: it must select hidden states 0..2 (or -4..-2) of this 3-block tower"),
    ("vit", ["--layer", "3"], "--layer 3: it must select hidden states 0..2"),
])
def test_settings_a_tower_cannot_serve_exit_2(tmp_path, tower_dirs, family, flags, message):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "encode_videos.py"), "--input", str(VIDEOS),
                             "--output", str(tmp_path / "o"), "--model", str(tower_dirs[family]), *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_metadata_written_before_towers_were_recorded_reads_as_todays(tiny_clip_dir):
    """A CLIP output of the previous version (``cls_attention`` in method_params, no tower, no mean/std) compares
    equal to what a run with the same settings records today, so it is read and resumed, not refused."""
    tower = describe_tower(str(tiny_clip_dir))
    for old_rule, importance in (("full_width", "cls"), ("head_mean", "cls_head_mean")):
        config = EncodeConfig(input="x", output="y", model=str(tiny_clip_dir), importance=importance).for_tower(tower)
        today = run_metadata(config, tower, config.preprocessing(tower))
        old = {key: value for key, value in today.items() if key != "tower"}
        old["method_params"] = {"budget": None, "k_neighbors": 32, "cls_attention": old_rule}
        old["preprocessing"] = {"mode": "crop", "image_size": 336, "anyres": False, "pinpoints": None}
        assert upgrade_metadata(old) == today and differing_settings(upgrade_metadata(old), today) == []
        assert upgrade_metadata(today) is today


def previous_version(metadata: dict) -> dict:
    """``metadata`` (a CLIP run's, today's form) as the version before towers were recorded wrote it."""
    old = {key: value for key, value in metadata.items() if key not in ("tower", "patch_size")}
    rule = {"cls": "full_width", "cls_head_mean": "head_mean"}[metadata["method_params"]["importance"]]
    old["method_params"] = {"budget": metadata["method_params"]["budget"],
                            "k_neighbors": metadata["method_params"]["k_neighbors"], "cls_attention": rule}
    old["preprocessing"] = {key: metadata["preprocessing"][key] for key in ("mode", "image_size", "anyres", "pinpoints")}
    return old


def test_an_output_of_the_previous_version_resumes_and_reads_whole(tmp_path, tiny_clip_dir, ray_local):
    """Its index in the old form, the next run's in today's: one output, read as one (the nested settings compared
    as values, not as the order their keys were written in)."""
    inputs = one_video(tmp_path / "in")
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=2)
    run(config)
    for path in sorted((output / "index").glob("*.parquet")):
        table = pq.read_table(path)
        old = previous_version(read_file_metadata(table.schema))
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(old).encode()}),
                       path)
    assert "cls_attention" in json.loads(pq.read_schema(path).metadata[METADATA_KEY])["method_params"]

    (inputs / "h265_video.mp4").symlink_to(VIDEOS / "h265_video.mp4")
    summary = run(config)
    assert (summary.encoded, summary.skipped) == (1, 1)
    reader = TokenReader(str(output))
    assert reader.metadata["tower"] == "clip" and reader.metadata["method_params"]["importance"] == "cls"
    assert sorted(len(reader.load(video_id).frames) for video_id in reader.video_ids()) == [2, 2]
