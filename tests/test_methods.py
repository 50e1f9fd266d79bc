"""Several reductions from one encoder pass (`--method a,b,...`), each in its own output; HoliTom in the job."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from damage import flip_byte, inside_tokens_page
from media import decode_frame, numbered_picture, video, write_h264
from operators.encode import VisionEncoder
from operators.frames import frame_rows
from operators.holitom import holitom
from operators.methods import HOLITOM_DEFAULTS, MethodSpec, parse_methods
from operators.prumerge import prumerge
from operators.towers import describe_tower
from pipeline.config import EncodeConfig
from pipeline.reader import TokenReader
from pipeline.lease import OutputLease
from pipeline.run import OutputBusy, RunSetupError, run
from pipeline.decoder import frame_request
from pipeline.encoder import EncodeTokens

CLIPS = ["h265_video.mp4", "video_0.mov"]
FOUR = "prumerge,prumerge+,fixed:8,holitom:0.25"
FOUR_DIRS = ["prumerge", "prumerge+", "fixed-8", "holitom-0.25"]


class CountingEncodeTokens(EncodeTokens):
    """The job's encoder stage, appending the images entering the tower's patch embedding (once per forward)
    to ``<output>.forwards``."""

    def __init__(self, config, preprocessing, threads=None) -> None:
        super().__init__(config, preprocessing, threads)

        def count(module, inputs) -> None:
            with open(f"{config.output}.forwards", "a") as log:
                log.write(f"{len(inputs[0])}\n")

        self.encoder.model.embeddings.register_forward_pre_hook(count)


# Ray's workers cannot import this test module: they get the class itself
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def forwards(output: Path) -> list[int]:
    return [int(line) for line in Path(f"{output}.forwards").read_text().split()]


def link_inputs(directory: Path, names=CLIPS) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        (directory / name).symlink_to(video(name))
    return directory


def rows_of(output: Path) -> dict[tuple[str, int], tuple]:
    """(video id, first frame) → (frames, tokens, positions, scores, first frames, last frames) of every row."""
    reader = TokenReader(str(output))
    found = {}
    for video_id in reader.video_ids():
        for row in reader.load(video_id).frames:
            view = row.global_view
            found[video_id, row.frame_index] = (row.frame_indices, view.tokens, view.positions, view.scores,
                                                view.first_frames, view.last_frames)
    return found


def test_method_specs_parse_and_name_their_folders():
    specs = parse_methods("prumerge, prumerge+,fixed:64,holitom:0.1")
    assert specs == (MethodSpec("prumerge"), MethodSpec("prumerge+"), MethodSpec("fixed", budget=64),
                     MethodSpec("holitom", retention=0.1))
    assert [s.dirname for s in specs] == ["prumerge", "prumerge+", "fixed-64", "holitom-0.1"]
    assert parse_methods("fixed", budget=16) == (MethodSpec("fixed", budget=16),), "--method fixed --budget K"
    for text, message in [("holitom", "retention"), ("holitom:0", "retention"), ("holitom:1.5", "retention"),
                          ("holitom:x", "retention"), ("fixed", "fixed:K"), ("fixed:0", "K must"),
                          ("fixed:2.5", "K must"), ("prumerge:3", "no value"), ("tome", "unknown method"),
                          ("prumerge,,fixed:3", "comma-separated"), ("prumerge,prumerge", "more than once"),
                          ("fixed:8,fixed:8", "more than once")]:
        with pytest.raises(ValueError, match=message):
            parse_methods(text)
    with pytest.raises(ValueError, match="--budget is only used"):
        parse_methods("prumerge,fixed", budget=8)


def test_temporal_methods_refuse_what_they_cannot_reduce(tmp_path, tiny_clip_dir):
    with pytest.raises(ValueError, match="does not take --anyres"):
        EncodeConfig(input="in", output="out", method="prumerge,holitom:0.1", anyres=True)
    with pytest.raises(ValueError, match="images have one"):
        EncodeConfig(input="in", output="out", media="image", method="holitom:0.1")
    with pytest.raises(ValueError, match="segment-frames"):
        EncodeConfig(input="in", output="out", method="holitom:0.1", segment_frames=0)
    tower = describe_tower(str(tiny_clip_dir))
    with pytest.raises(ValueError, match=f"fixed:{tower.grid_size ** 2 + 1}: the model has {tower.grid_size ** 2} "
                                         f"patches per view; use 1..{tower.grid_size ** 2}"):
        EncodeConfig(input="in", output="out", method=f"prumerge,fixed:{tower.grid_size ** 2 + 1}").for_tower(tower)


def test_four_methods_one_forward_per_frame_each_as_if_alone(tmp_path, tiny_clip_dir, ray_local):
    """Four methods: each frame goes through the tower once; each method's output holds what that method
    computes on the tower's output for the same decoded frames (PruMerge, PruMerge+, the fixed budget, HoliTom
    over the video's frames as one segment)."""
    inputs = link_inputs(tmp_path / "in")
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=6,
                          method=FOUR, k_neighbors=8, batch_size=4)
    summary = run(config, encoder_stage=CountingEncodeTokens)
    frames = 6 + 3  # video_0.mov has 3 frames
    assert sum(forwards(output)) == summary.frames == frames, "one forward per frame, whatever the methods"
    assert sorted(p.name for p in output.iterdir()) == sorted([*FOUR_DIRS, "lease", "logs"])
    assert list(summary.methods) == FOUR.split(",")
    for name in FOUR_DIRS:
        record = json.loads((output / name / "manifest.json").read_text())
        assert record["status"] == "completed" and record["config"]["method"] == FOUR
        assert TokenReader(str(output / name)).metadata == {**record["run_metadata"], "schema_version": "5"}

    # each method on the tower's output for the same decoded frames, computed here, one segment per video
    tower = describe_tower(str(tiny_clip_dir))
    resolved = config.for_tower(tower)
    encoder = VisionEncoder(str(tiny_clip_dir), device="cpu")
    outputs = {name: rows_of(output / name) for name in FOUR_DIRS}
    reader = TokenReader(str(output / "holitom-0.25"))
    assert reader.metadata["method"] == "holitom"
    assert reader.metadata["method_params"] == {"retention": 0.25, "importance": "cls", "segment_frames": 32,
                                                **HOLITOM_DEFAULTS}
    for name in CLIPS:
        rows = [row for row in frame_rows(frame_request(resolved, resolved.preprocessing(tower), str(inputs / name)))
                if row["kind"] == "frame"]
        numbers = [row["frame_index"] for row in rows]
        out = encoder(tower.preprocessing.normalize(torch.from_numpy(np.concatenate([r["pixels"] for r in rows]))))
        [video_id] = [v for v in reader.video_ids() if reader.load(v).source_path.endswith(name)]
        for spec in parse_methods(FOUR)[:3]:
            got = outputs[spec.dirname]
            want = prumerge(out.features, out.keys, out.importance, mode=spec.name, budget=spec.budget, k_neighbors=8)
            assert [k for k in got if k[0] == video_id] == [(video_id, n) for n in numbers]
            for number, tokens, positions, scores in zip(numbers, want.tokens, want.positions, want.scores):
                covered, stored, stored_positions, stored_scores, first, last = got[video_id, number]
                assert covered == (number,) and (first == number).all() and (last == number).all()
                assert stored_positions.tolist() == positions.tolist()
                torch.testing.assert_close(stored.float(), tokens.half().float())
                torch.testing.assert_close(stored_scores, scores)
        got = outputs["holitom-0.25"]
        windows = holitom(out.features, out.importance, 0.25, **HOLITOM_DEFAULTS)
        assert [k for k in got if k[0] == video_id] == [(video_id, numbers[w.start]) for w in windows]
        for window in windows:
            covered, tokens, positions, scores, first, last = got[video_id, numbers[window.start]]
            assert covered == tuple(numbers[window.start:window.end + 1])
            assert positions.tolist() == window.positions.tolist()
            assert first.tolist() == [numbers[i] for i in window.first_frame.tolist()]
            assert last.tolist() == [numbers[i] for i in window.last_frame.tolist()]
            torch.testing.assert_close(tokens.float(), window.tokens.half().float())
            torch.testing.assert_close(scores, window.scores)


def test_a_static_clip_is_one_window(tmp_path, tiny_clip_dir, ray_local):
    """A clip showing one picture throughout: HoliTom makes one window, its static tokens stand for every
    frame; the tokens kept are at most the retention's share plus one per frame."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    picture = decode_frame(video("bt709_full_range.mp4"))
    write_h264(inputs / "still.mp4", [picture] * 30, 10, {"g": "30"})
    output = tmp_path / "out"
    run(EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=10,
                     method="holitom:0.1"))
    reader = TokenReader(str(output))
    [row] = reader.load(reader.video_ids()[0]).frames
    patches = reader.metadata["patch_grid"][0] * reader.metadata["patch_grid"][1]
    assert len(row.frame_indices) == 10 and row.frame_index == row.frame_indices[0]
    static = (row.global_view.first_frames == row.frame_indices[0]) & (row.global_view.last_frames == row.frame_indices[-1])
    assert static.all(), "every token stands for the whole window"
    assert 0 < row.num_tokens <= round(0.1 * 10 * patches) + 1


def test_layouts_are_not_mixed_and_each_method_folder_has_its_lease(tmp_path, tiny_clip_dir, ray_local):
    inputs = link_inputs(tmp_path / "in", CLIPS[1:])
    single, several = tmp_path / "single", tmp_path / "several"
    base = EncodeConfig(input=str(inputs), output=str(single), model=str(tiny_clip_dir), num_frames=2)
    run(base)
    with pytest.raises(RunSetupError, match="holds the output of a single method"):
        run(dataclasses.replace(base, method="prumerge,holitom:0.5"))
    (tmp_path / "recorded" / "runs").mkdir(parents=True)  # a one-method run killed before its first commit
    with pytest.raises(RunSetupError, match="holds the output of a single method"):
        run(dataclasses.replace(base, output=str(tmp_path / "recorded"), method="prumerge,holitom:0.5"))

    with OutputLease(str(several / "holitom-0.5"), "another-job") as held:  # a job writing one folder alone
        with pytest.raises(OutputBusy, match="holitom-0.5 is being written by another job"):
            run(dataclasses.replace(base, output=str(several), method="prumerge,holitom:0.5"))
        left = [json.loads(p.read_text()) for p in several.glob("**/lease/*.json") if str(p) != held.path]
        assert left and all(lease["released"] for lease in left), "all taken, or none: those taken are released"
    with OutputLease(str(several), "a-one-method-job"):  # a job writing the top alone: the same lease
        with pytest.raises(OutputBusy, match="several is being written by another job: run a-one-method-job"):
            run(dataclasses.replace(base, output=str(several), method="prumerge,holitom:0.5"))
    assert not (several / "manifest.json").exists() and not list(several.glob("*/manifest.json"))
    run(dataclasses.replace(base, output=str(several), method="prumerge,holitom:0.5"))
    fresh = tmp_path / "fresh"
    with OutputLease(str(fresh), "a-multi-method-job"):  # and the other way round, before it committed anything
        with pytest.raises(OutputBusy, match="fresh is being written by another job: run a-multi-method-job"):
            run(dataclasses.replace(base, output=str(fresh)))
    with pytest.raises(RunSetupError, match=r"holds one folder per method \(holitom-0.5, prumerge\)"):
        run(dataclasses.replace(base, output=str(several)))
    with pytest.raises(FileNotFoundError, match=r"holds one output per method \(holitom-0.5, prumerge\).*open one"):
        TokenReader(str(several))
    summary = run(dataclasses.replace(base, output=str(several / "prumerge")))
    assert (summary.frames, summary.skipped) == (0, 1), "one method's folder is an output of its own"


def shots_clip(directory: Path) -> Path:
    """20 frames in five shots (pictures 1, 6, 9, 6, 1, 4 frames each): HoliTom makes several windows."""
    directory.mkdir(parents=True, exist_ok=True)
    pictures = [numbered_picture(n) for n in (1, 6, 9, 6, 1) for _ in range(4)]
    return write_h264(directory / "shots.mp4", pictures, 10, {"g": "1"})


def windows_of(output: Path) -> list[tuple]:
    """Every HoliTom window of the output's one video: (frames, tokens, positions, first frames, last frames)."""
    reader = TokenReader(str(output))
    [video_id] = reader.video_ids()
    return [(row.frame_indices, row.global_view.tokens, row.global_view.positions, row.global_view.first_frames,
             row.global_view.last_frames) for row in reader.load(video_id).frames]


def encode_shots(tmp_path: Path, model: Path, method: str) -> tuple[EncodeConfig, Path]:
    """``shots_clip``'s 20 frames encoded with ``method`` in segments of 8, a unit per shard: (config, output)."""
    inputs = tmp_path / "in"
    shots_clip(inputs)
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(model), num_frames=20, method=method,
                          frames_per_shard=1, segment_frames=8)
    run(config)
    return config, output


def assert_same_windows(got: list[tuple], want: list[tuple]) -> None:
    assert [w[0] for w in got] == [w[0] for w in want]
    for a, b in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_holitom_windows_come_from_fixed_segments_whatever_was_resumed_and_beside_whatever(tmp_path, tiny_clip_dir,
                                                                                        ray_local):
    """Segments are fixed on the sampling grid (8, 8 and 4 frames here) and a segment is committed whole. Two
    segments that are not neighbours set aside, and frames of every segment set aside for a per-frame method
    beside it (so the decoder decodes frames HoliTom does not need, and HoliTom's frames arrive among them):
    HoliTom re-encodes exactly those two segments into the windows and tokens of the first run, resumed beside
    the other method or alone; every frame is read once and no window crosses a segment."""
    config, output = encode_shots(tmp_path, tiny_clip_dir, "prumerge,holitom:0.5")
    before = windows_of(output / "holitom-0.5")
    assert len(before) >= 4, f"the shots give windows: {[w[0] for w in before]}"
    shards = sorted((output / "holitom-0.5" / "shards").glob("*.parquet"))
    by_segment = {int(pq.read_table(path, columns=["frame_index"])["frame_index"][0].as_py()) // 8: path
                  for path in shards}
    assert sorted(by_segment) == [0, 1, 2] and len(shards) == 3, "one shard per segment (a unit each)"
    for segment in (0, 2):
        flip_byte(by_segment[segment], inside_tokens_page(by_segment[segment]))
    for shard in sorted((output / "prumerge" / "shards").glob("*.parquet"))[3:12:2]:  # in every segment
        flip_byte(shard, inside_tokens_page(shard))
    alone = tmp_path / "alone"
    shutil.copytree(output / "holitom-0.5", alone)
    beside = run(dataclasses.replace(config, set_aside_damaged=True))
    assert (beside.methods["prumerge"]["frames"], beside.methods["holitom:0.5"]["frames"]) == (5, 8 + 4)
    resumed_alone = run(dataclasses.replace(config, output=str(alone), method="holitom:0.5", set_aside_damaged=True))
    assert resumed_alone.frames == 8 + 4, "only the two segments set aside are encoded again"
    for output_ in (output / "holitom-0.5", alone):
        after = windows_of(output_)
        assert [i for window in after for i in window[0]] == list(range(20))
        assert all(w[0][-1] // 8 == w[0][0] // 8 for w in after), "no window crosses a segment"
        assert_same_windows(after, before)


def test_each_method_gets_back_exactly_what_it_lacks(tmp_path, tiny_clip_dir, ray_local):
    """A resumed run encodes a frame once for all the methods that lack it, and writes it only to those:
    a method whose output already has it gets nothing twice."""
    inputs = link_inputs(tmp_path / "in", CLIPS[:1])
    output = tmp_path / "out"
    config = EncodeConfig(input=str(inputs), output=str(output), model=str(tiny_clip_dir), num_frames=6,
                          method="prumerge,holitom:0.5", frames_per_shard=1)
    run(config)
    before = {name: rows_of(output / name) for name in ("prumerge", "holitom-0.5")}
    # one prumerge frame damaged; then also one holitom window
    shards = sorted((output / "prumerge" / "shards").glob("*.parquet"))
    flip_byte(shards[0], inside_tokens_page(shards[0]))
    summary = run(dataclasses.replace(config, set_aside_damaged=True), encoder_stage=CountingEncodeTokens)
    assert sum(forwards(output)) == 1 and summary.methods["prumerge"]["rows"] == 1
    assert summary.methods["holitom:0.5"]["rows"] == 0
    window = sorted((output / "holitom-0.5" / "shards").glob("*.parquet"))[0]
    flip_byte(window, inside_tokens_page(window))
    Path(f"{output}.forwards").unlink()
    summary = run(dataclasses.replace(config, set_aside_damaged=True), encoder_stage=CountingEncodeTokens)
    assert summary.methods["prumerge"]["rows"] == 0, "prumerge had every frame"
    assert sum(forwards(output)) == summary.methods["holitom:0.5"]["frames"] > 0
    for name, rows in before.items():
        after = rows_of(output / name)
        covered = sorted(i for row in after.values() for i in row[0])
        assert covered == sorted(i for row in rows.values() for i in row[0]), f"{name}: every frame exactly once"
