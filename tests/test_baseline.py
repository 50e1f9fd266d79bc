"""The benchmarks' yardstick (`benchmarks/naive_baseline.py`) computes what the job computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY_VISION
from media import video
from operators.prumerge import prumerge

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from naive_baseline import published_prumerge  # noqa: E402


@pytest.mark.parametrize("outliers", [1, 5, 12])
def test_published_prumerge_on_one_frame_equals_the_operator(outliers):
    """On a batch of one frame the published statistics are that frame's, so both must agree."""
    generator = torch.Generator().manual_seed(outliers)
    n, channels = 576, 16
    features = torch.randn(1, n, channels, generator=generator)
    keys = torch.randn(1, n + 1, channels, generator=generator)  # with CLS
    scores = torch.rand(1, n, generator=generator) * 0.01
    scores[0, torch.randperm(n, generator=generator)[:outliers]] += 1 + torch.rand(outliers, generator=generator)

    published = published_prumerge(features, keys, scores)[0]  # [outliers+1, C], descending score, extra last
    ours = prumerge(features, keys[:, 1:], scores, mode="prumerge")
    order = ours.scores[0][:-1].argsort(descending=True)
    assert ours.num_tokens == [outliers + 1]
    torch.testing.assert_close(ours.tokens[0][:-1][order], published[:-1])
    torch.testing.assert_close(ours.tokens[0][-1], published[-1])


def test_naive_baseline_writes_every_sampled_frame(tiny_clip_dir, tmp_path):
    clips = tmp_path / "videos"
    clips.mkdir()
    for name in ("flipping_a_pancake.mkv", "nasa_13013.mp4"):
        (clips / name).symlink_to(video(name))
    command = [sys.executable, str(BENCHMARKS / "naive_baseline.py"), "--input", str(clips), "--output",
               str(tmp_path / "out"), "--model", str(tiny_clip_dir), "--num-frames", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 frames, 0 videos skipped" in result.stdout
    for name in ("flipping_a_pancake", "nasa_13013"):
        table = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert table.num_rows == 3
        for tokens in table.column("tokens").to_pylist():
            assert len(tokens) > 0 and len(tokens) % TINY_VISION["hidden_size"] == 0
