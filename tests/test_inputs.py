"""Input listing: every real file once, with an id that does not depend on how it was named.

Directories, globs, list files, Parquet/CSV path columns, URIs; bracketed names, symbolic-link cycles,
non-UTF-8 names and hand-edited list files."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipeline.inputs as inputs
from pipeline.inputs import list_inputs, local_file, redact_credentials

LATIN1_NAME = os.fsdecode(b"caf\xe9.jpg")  # a file name that is not valid UTF-8 (Latin-1 "café.jpg")


@pytest.fixture
def tree(tmp_path):
    for name in ("a/clip.mp4", "b/clip.mp4", "b/deep/x.MKV", "c/photo.jpg", "notes.txt", "a/.hidden.mp4",
                 ".cache/y.mp4"):
        path = tmp_path / "media" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return tmp_path / "media"


def ids_by_path(spec, media="video") -> dict[str, str]:
    return {item.source_path: item.video_id for item in list_inputs(str(spec), media).items}


def test_directory_is_searched_recursively_with_128_bit_ids(tree):
    listing = list_inputs(str(tree), "video")
    assert [i.source_path for i in listing.items] == [str(tree / p) for p in ("a/clip.mp4", "b/clip.mp4", "b/deep/x.MKV")]
    assert all(re.fullmatch(r"(clip|x)-[0-9a-f]{32}", i.video_id) for i in listing.items)
    assert len({i.video_id for i in listing.items}) == 3, "equal basenames, different ids"
    assert listing.duplicates == [] and listing.notes == []
    assert [i.source_path for i in list_inputs(str(tree), "image").items] == [str(tree / "c/photo.jpg")]


def test_one_file_keeps_one_id_however_it_is_named(tree, tmp_path, monkeypatch):
    clip = tree / "a" / "clip.mp4"
    expected = ids_by_path(tree)[str(clip)]
    assert ids_by_path(tree / "a")[str(clip)] == expected, "its folder"
    assert ids_by_path(tree.parent)[str(clip)] == expected, "a wider root"
    assert ids_by_path(clip) == {str(clip): expected}, "the file itself"
    assert ids_by_path(f"file://{clip}") == {str(clip): expected}, "a file URI"
    assert ids_by_path(tree / "*" / "clip.mp4")[str(clip)] == expected, "a glob"
    (tmp_path / "link.mp4").symlink_to(clip)
    assert list(ids_by_path(tmp_path / "link.mp4").values()) == [expected], "a symbolic link to it"
    monkeypatch.chdir(tree / "a")
    assert list(ids_by_path("clip.mp4").values()) == [expected], "relative to the working directory"

    listing_file = tmp_path / "list.txt"
    names = ["a/clip.mp4", "./a/clip.mp4", f"/{clip}", f"{tree}/b/../a/clip.mp4", str(tmp_path / "link.mp4")]
    listing_file.write_text("".join(f"{name}\n" for name in names))
    (tmp_path / "a").symlink_to(tree / "a")  # "a/clip.mp4" is relative to the list file's folder
    listing = list_inputs(str(listing_file), "video")
    assert [(i.video_id, i.source_path) for i in listing.items] == [(expected, str(tmp_path / "a" / "clip.mp4"))]
    assert [name for name, _ in listing.duplicates] == [f"{listing_file}:{n}" for n in range(2, 6)], \
        "each other name of the same file is reported, not encoded again"


def test_a_path_that_exists_is_a_path_whatever_its_characters(tmp_path):
    folder = tmp_path / "photos [2020]"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg", "sub/c.png"):
        (folder / name).write_bytes(b"x")
    (tmp_path / "photos 2").mkdir()  # what "[2020]" would match as a character class
    (tmp_path / "photos 2" / "wrong.jpg").write_bytes(b"x")

    assert list(ids_by_path(folder, "image")) == [str(folder / p) for p in ("a.jpg", "sub/b.jpg", "sub/c.png")]
    assert list(ids_by_path(folder / "a.jpg", "image")) == [str(folder / "a.jpg")]
    # A pattern below an existing folder: the folder is literal, the rest is the pattern.
    assert list(ids_by_path(folder / "*.jpg", "image")) == [str(folder / "a.jpg")], "* does not cross folders"
    assert list(ids_by_path(folder / "**" / "*.jpg", "image")) == [str(folder / p) for p in ("a.jpg", "sub/b.jpg")]
    assert list(ids_by_path(tmp_path / "photos [0-9]" / "*.jpg", "image")) == [str(tmp_path / "photos 2/wrong.jpg")], \
        "a name that does not exist is a glob"
    assert list_inputs(str(folder / "*.webp"), "image").items == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "missing"), "image")


def test_symbolic_link_cycles_list_each_real_file_once(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "one.jpg").write_bytes(b"1")
    (root / "sub" / "two.jpg").write_bytes(b"2")
    (root / "sub" / "loop").symlink_to(root)  # a cycle
    (root / "sub" / "self").symlink_to(root / "sub")
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")  # listed: its error row will say it is missing
    listing = list_inputs(str(root), "image")
    assert [i.source_path for i in listing.items] == [str(root / "dangling.jpg"), str(root / "one.jpg"),
                                                      str(root / "sub" / "two.jpg")]
    assert sorted(listing.notes) == [f"{root / 'sub' / name}: the same folder as one already listed (a link); "
                                     "not listed again" for name in ("loop", "self")]


def test_a_name_that_is_not_utf8_is_an_input_with_its_problem_and_a_stable_id(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    (root / LATIN1_NAME).write_bytes(b"x")
    listing = list_inputs(str(root), "image")
    bad = next(i for i in listing.items if i.problem)
    assert bad.source_path == str(root) + "/caf\\xe9.jpg" and "not valid UTF-8" in bad.problem
    assert bad.source_path.encode("utf-8"), "what the shards record is text"
    assert [i.problem for i in listing.items if i is not bad] == [""]
    assert re.fullmatch(r"caf-[0-9a-f]{32}", bad.video_id)
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"in/caf\xe9.jpg\n")
    assert [i.video_id for i in list_inputs(str(listed), "image").items] == [bad.video_id]


def test_list_file_format(tmp_path):
    for name in ("#hash.jpg", "trailing .jpg", "plain.jpg", "sub/rel.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"\xef\xbb\xbfplain.jpg\r\n"  # a byte-order mark, Windows line ends
                       b"# a comment\n"
                       b"#hash.jpg\n"  # a comment that names a file: reported
                       b"./#hash.jpg\n"
                       b"   \n"
                       b"trailing .jpg\n"  # the space is part of the name
                       b"sub/rel.jpg\n"
                       b"s3://bucket/x#y.jpg\n"  # a URI cannot hold '#'
                       b"s3://bucket/\xff.jpg\n")
    listing = list_inputs(str(listed), "image")
    assert [i.source_path for i in listing.items] == [str(tmp_path / n) for n in
                                                      ("plain.jpg", "#hash.jpg", "trailing .jpg", "sub/rel.jpg")]
    assert [note.split(": ", 1)[0] for note in listing.notes] == [f"{listed}:{n}" for n in (3, 8, 9)]
    assert "write it as ./#hash.jpg" in listing.notes[0]
    assert "%23" in listing.notes[1] and "not valid UTF-8" in listing.notes[2]


@pytest.mark.parametrize("kind", ["string", "large_string", "string_view", "dictionary", "binary", "large_binary"])
def test_path_tables_take_text_or_bytes(tmp_path, kind):
    (tmp_path / "x.mp4").write_bytes(b"x")
    (tmp_path / LATIN1_NAME).write_bytes(b"x")
    names = [str(tmp_path / "x.mp4"), None, os.fsencode(tmp_path / LATIN1_NAME), "  "]
    if kind in ("binary", "large_binary"):
        column = pa.array([n if n is None or isinstance(n, bytes) else n.encode() for n in names], getattr(pa, kind)())
    else:
        text = [names[0], None, "  "]
        column = pa.array(text, pa.string()).dictionary_encode() if kind == "dictionary" else pa.array(text, getattr(pa, kind)())
    pq.write_table(pa.table({"label": pa.array([1] * len(column)), "path": column}), tmp_path / "list.parquet")
    listing = list_inputs(str(tmp_path / "list.parquet"), "video")
    assert listing.items[0].source_path == str(tmp_path / "x.mp4") and not listing.items[0].problem
    assert listing.notes == [f"{tmp_path / 'list.parquet'} row {n}: no path" for n in (2, len(column))]
    if kind in ("binary", "large_binary"):
        assert "not valid UTF-8" in listing.items[1].problem


def test_csv_paths_are_text_even_when_they_look_like_numbers(tmp_path):
    (tmp_path / "123").write_bytes(b"x")
    (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbfpath,n\n123,1\n")  # a byte-order mark, as Excel writes
    assert [i.source_path for i in list_inputs(str(tmp_path / "list.csv"), "video").items] == [str(tmp_path / "123")]


def test_bad_tables(tmp_path):
    pq.write_table(pa.table({"file": ["a.mp4"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="'path' column"):
        list_inputs(str(tmp_path / "wrong.parquet"), "video")
    (tmp_path / "wrong.csv").write_text("file,n\na.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_inputs(str(tmp_path / "wrong.csv"), "video")
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match="not text or bytes"):
        list_inputs(str(tmp_path / "numbers.parquet"), "video")


def test_an_id_collision_is_refused_never_dropped(tree, monkeypatch):
    monkeypatch.setattr(inputs, "make_video_id", lambda canonical: "same")
    with pytest.raises(ValueError, match="same video_id same"):
        list_inputs(str(tree), "video")


def test_local_file_is_the_path_itself(tree):
    item = list_inputs(f"file://{tree}", "video").items[0]
    with local_file(pafs.LocalFileSystem(), item.path) as path:
        assert path == str(tree / "a" / "clip.mp4") and open(path, "rb").read() == b"a/clip.mp4"


S3_KEYS = ["media/a b.jpg", "media/café.jpg", "media/x#1.jpg", "media/q?.jpg", "media/d/e f.jpg", "media/p%20.jpg"]


@pytest.fixture(scope="module")
def s3_bucket(s3_client):
    """Bucket ``bkt`` holding `S3_KEYS` (each object's bytes are its key) and a list file."""
    client, credentials, options = s3_client
    client.create_bucket(Bucket="bkt")
    for key in S3_KEYS:
        client.put_object(Bucket="bkt", Key=key, Body=key.encode())
    # Relative paths (to the list's folder) are taken as written; URIs are percent-encoded.
    lines = ["a b.jpg", "s3://bkt/media/caf%C3%A9.jpg", "d/e f.jpg", "x#1.jpg", "s3://bkt/media/q%3F.jpg",
             "/media/a b.jpg", "s3://bkt/media/d"]
    client.put_object(Bucket="bkt", Key="media/list.txt", Body="\n".join(lines).encode())
    return options, credentials


def test_s3_keys_with_awkward_characters_round_trip(s3_bucket):
    options, credentials = s3_bucket
    listing = list_inputs(f"s3://{credentials}bkt/media?{options}", "image")
    assert [i.path for i in listing.items] == sorted(f"bkt/{key}" for key in S3_KEYS)
    assert {i.source_path for i in listing.items} == {
        "s3://bkt/media/a%20b.jpg", "s3://bkt/media/caf%C3%A9.jpg", "s3://bkt/media/x%231.jpg",
        "s3://bkt/media/q%3F.jpg", "s3://bkt/media/d/e%20f.jpg", "s3://bkt/media/p%2520.jpg"}, \
        "percent-encoded URIs, without the options or the credentials"
    for item in listing.items:  # opened with the filesystem that listed it, options and all
        with local_file(listing.filesystems[item.filesystem], item.path) as path:
            assert open(path, "rb").read() == item.path.removeprefix("bkt/").encode()
        assert pafs.FileSystem.from_uri(f"{item.source_path}?{options}")[1] == item.path, "source_path parses back"

    by_path = {i.path: i.video_id for i in listing.items}
    glob = list_inputs(f"s3://{credentials}bkt/media/*.jpg?{options}", "image")
    assert [i.path for i in glob.items] == sorted(f"bkt/{k}" for k in S3_KEYS if k.count("/") == 1)
    assert all(by_path[i.path] == i.video_id for i in glob.items), "same ids from a glob"

    listed = list_inputs(f"s3://{credentials}bkt/media/list.txt?{options}", "image")
    assert [i.path for i in listed.items] == ["bkt/media/a b.jpg", "bkt/media/café.jpg", "bkt/media/d/e f.jpg",
                                              "bkt/media/x#1.jpg", "bkt/media/q?.jpg", "bkt/media/d"]
    assert all(by_path[i.path] == i.video_id for i in listed.items[:-1]), "same ids from a list file"
    assert [note.split(": ", 1)[0] for note in listed.notes] == ["bkt/media/list.txt:6"], "an absolute path on S3"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with local_file(listed.filesystems[listed.items[-1].filesystem], listed.items[-1].path):
            pass


def test_dot_dot_after_a_link_is_the_folder_the_kernel_opens(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "work" / "x.mp4").write_bytes(b"near")
    (tmp_path / "elsewhere" / "x.mp4").write_bytes(b"far")
    (tmp_path / "work" / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    monkeypatch.chdir(tmp_path / "work")
    assert open("link/../x.mp4", "rb").read() == b"far"
    (item,) = list_inputs("link/../x.mp4", "video").items
    assert item.source_path == str(tmp_path / "elsewhere" / "x.mp4")
    (tmp_path / "work" / "list.txt").write_text("link/../x.mp4\n./x.mp4\n")
    assert [i.source_path for i in list_inputs("list.txt", "video").items] == [
        str(tmp_path / "elsewhere" / "x.mp4"), str(tmp_path / "work" / "x.mp4")]


def test_an_entry_that_cannot_be_listed_is_a_note_and_the_rest_is_listed(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.mp4").write_bytes(b"x")
    (root / "a.mp4").symlink_to(root / "b.mp4")  # a loop of file links
    (root / "b.mp4").symlink_to(root / "a.mp4")
    os.mkfifo(root / "pipe.mp4")
    listing = list_inputs(str(root), "video")
    assert [i.source_path for i in listing.items] == [str(root / "ok.mp4")]
    loop = "cannot be examined (Too many levels of symbolic links)"
    assert sorted(listing.notes) == [f"{root / 'a.mp4'}: {loop}", f"{root / 'b.mp4'}: {loop}",
                                     f"{root / 'pipe.mp4'}: not a regular file"]


def test_a_name_that_is_not_utf8_given_as_the_input(tmp_path):
    folder = tmp_path / os.fsdecode(b"d\xe9")
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"x")
    (item,) = list_inputs(str(folder), "image").items
    assert item.problem and item.source_path == str(tmp_path) + "/d\\xe9/x.jpg" and item.path == ""
    assert [i.video_id for i in list_inputs(str(folder / "x.jpg"), "image").items] == [item.video_id]


def test_hidden_names_are_matched_only_when_the_pattern_names_them(tree):
    assert [i.source_path for i in list_inputs(str(tree / "**" / "*.mp4"), "video").items] == [
        str(tree / "a/clip.mp4"), str(tree / "b/clip.mp4")]
    assert [i.source_path for i in list_inputs(str(tree / "**" / ".cache" / "*.mp4"), "video").items] == [
        str(tree / ".cache/y.mp4")]
    assert [i.source_path for i in list_inputs(str(tree / "a" / ".*.mp4"), "video").items] == [
        str(tree / "a/.hidden.mp4")]


def test_list_files_that_are_not_utf8_text(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"x")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("x.mp4\n", encoding="utf-16")
    with pytest.raises(ValueError, match="UTF-16.*save it as UTF-8"):
        list_inputs(str(utf16), "video")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"x.mp4\nx\0y.mp4\n")
    listing = list_inputs(str(nul), "video")
    assert [i.source_path for i in listing.items] == [str(tmp_path / "x.mp4")]
    assert listing.notes == [f"{nul}:2: holds a NUL byte (a binary or UTF-16 file?): b'x\\x00y.mp4'"]
    with pytest.raises(ValueError, match="takes no options"):
        list_inputs(f"file://{tmp_path}/x.mp4?x=1", "video")


def test_credentials_are_redacted():
    assert redact_credentials("--input s3://KEY:SECRET@bkt/v?endpoint_override=h:9 --output gs://tok@b/o") == \
        "--input s3://***@bkt/v?endpoint_override=h:9 --output gs://***@b/o"
    assert redact_credentials("/data/a@b.mp4") == "/data/a@b.mp4"
