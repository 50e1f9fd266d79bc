"""Input listing: directories, globs, list files, Parquet/CSV path columns, URIs, stable unique ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import list_inputs, local_file, make_video_id


@pytest.fixture
def tree(tmp_path):
    for name in ("a/clip.mp4", "b/clip.mp4", "b/deep/x.MKV", "c/photo.jpg", "notes.txt", "a/.hidden.mp4"):
        path = tmp_path / "media" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "media"


def test_directory_is_searched_recursively_with_unique_stable_ids(tree):
    items = list_inputs(str(tree), "video")
    assert sorted(i.source_path for i in items) == [str(tree / p) for p in ("a/clip.mp4", "b/clip.mp4", "b/deep/x.MKV")]
    ids = [i.video_id for i in items]
    assert len(set(ids)) == 3 and all(i.startswith(("clip-", "x-")) for i in ids)
    assert ids == [i.video_id for i in list_inputs(str(tree), "video")], "ids are stable across listings"
    assert [i.source_path for i in list_inputs(str(tree), "image")] == [str(tree / "c/photo.jpg")]


def test_ids_do_not_depend_on_where_the_tree_is_mounted(tree, tmp_path):
    moved = tmp_path / "elsewhere"
    tree.rename(moved)
    assert {i.video_id for i in list_inputs(str(moved), "video")} == {
        make_video_id("a/clip.mp4"), make_video_id("b/clip.mp4"), make_video_id("b/deep/x.MKV")}


def test_glob_list_file_table_and_uri(tree, tmp_path):
    assert [i.source_path for i in list_inputs(str(tree / "*" / "clip.mp4"), "video")] == [
        str(tree / "a/clip.mp4"), str(tree / "b/clip.mp4")]
    assert len(list_inputs(str(tree / "**" / "*.MKV"), "video")) == 1

    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{tree / 'a/clip.mp4'}\n\n{tree / 'b/clip.mp4'}\n{tree / 'a/clip.mp4'}\n")
    assert [i.source_path for i in list_inputs(str(listing), "video")] == [str(tree / "a/clip.mp4"), str(tree / "b/clip.mp4")]

    table = pa.table({"path": [str(tree / "b/clip.mp4")], "label": ["x"]})
    pq.write_table(table, tmp_path / "list.parquet")
    pacsv.write_csv(table, tmp_path / "list.csv")
    for name in ("list.parquet", "list.csv"):
        assert [i.source_path for i in list_inputs(str(tmp_path / name), "video")] == [str(tree / "b/clip.mp4")]

    uri_items = list_inputs(f"file://{tree}", "video")
    assert len(uri_items) == 3
    with local_file(uri_items[0].source_path) as path:
        assert open(path, "rb").read() == b"x"


def test_bad_input_specs(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "missing"), "video")
    pq.write_table(pa.table({"file": ["a.mp4"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="'path' column"):
        list_inputs(str(tmp_path / "wrong.parquet"), "video")
