"""List the inputs of a run, give each a stable unique id, and read what earlier runs already committed."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
TABLE_EXTENSIONS = frozenset({".parquet", ".csv"})
PATH_COLUMN = "path"
FETCH_ATTEMPTS = 3  # reads of a remote input before its failure is the run's (transient), never the input's
FETCH_BACKOFF_S = 2.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputItem:
    video_id: str  # stable: derived from the path relative to the input root (or as listed)
    source_path: str  # what decoders open: a local path or a filesystem URI


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _as_uri(fs: pafs.FileSystem, spec: str, path: str) -> str:
    """``path`` as listed by ``fs``, turned back into a URI with ``spec``'s scheme when remote."""
    return path if is_local(fs) else f"{spec.split('://', 1)[0]}://{path}"


def make_video_id(key: str) -> str:
    """Readable and unique: the file's stem plus a hash of its relative path (``a/clip.mp4`` ≠ ``b/clip.mp4``)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(key).stem)[:48] or "input"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def list_inputs(spec: str, media: str) -> list[InputItem]:
    """Expand ``spec`` (directory, glob, list file, Parquet/CSV with a ``path`` column, or one file) to inputs.

    Directories are searched recursively for ``media`` extensions; ids come from paths relative to
    the directory (or to the glob's fixed prefix). Listed paths are taken as given, ids from them as written.
    """
    extensions = VIDEO_EXTENSIONS if media == "video" else IMAGE_EXTENSIONS
    fs, path = filesystem_and_path(spec)
    if any(ch in spec for ch in "*?["):
        return _from_glob(fs, spec, path, extensions)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(path, recursive=True)
        files = sorted(
            f.path for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in extensions
            and not PurePosixPath(f.path).name.startswith(".")
        )
        return _unique([InputItem(make_video_id(os.path.relpath(f, path)), _as_uri(fs, spec, f)) for f in files])
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"--input {spec!r} does not exist")
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in LIST_EXTENSIONS:
        with fs.open_input_stream(path) as stream:
            lines = stream.read().decode().splitlines()
        listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return _unique([InputItem(make_video_id(p), p) for p in listed])
    if suffix in TABLE_EXTENSIONS:
        with fs.open_input_file(path) as handle:
            table = pq.read_table(handle) if suffix == ".parquet" else pacsv.read_csv(handle)
        if PATH_COLUMN not in table.column_names:
            raise ValueError(f"--input {spec!r} has no {PATH_COLUMN!r} column (columns: {table.column_names})")
        listed = [p for p in table.column(PATH_COLUMN).to_pylist() if p]
        return _unique([InputItem(make_video_id(p), p) for p in listed])
    return [InputItem(make_video_id(PurePosixPath(path).name), spec)]


def _from_glob(fs: pafs.FileSystem, spec: str, path: str, extensions: frozenset[str]) -> list[InputItem]:
    prefix = path[: min(path.index(ch) for ch in "*?[" if ch in path)]
    root = prefix if prefix.endswith("/") else os.path.dirname(prefix)
    if is_local(fs):
        matches = sorted(m for m in glob.glob(path, recursive=True) if os.path.isfile(m))
    else:
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        matches = sorted(f.path for f in listing if f.type == pafs.FileType.File and fnmatch.fnmatch(f.path, path))
    matches = [m for m in matches if PurePosixPath(m).suffix.lower() in extensions]
    return _unique([InputItem(make_video_id(os.path.relpath(m, root)), _as_uri(fs, spec, m)) for m in matches])


def _unique(items: list[InputItem]) -> list[InputItem]:
    """Drop repeated listings of the same input (same id), keeping the first."""
    seen: dict[str, InputItem] = {}
    for item in items:
        seen.setdefault(item.video_id, item)
    return list(seen.values())


@contextlib.contextmanager
def local_file(source_path: str) -> Iterator[str]:
    """A local path for ``source_path``: itself when local, else a temporary copy (`fetch`), made once.

    Raises:
        FileNotFoundError: the remote file does not exist.
        OSError: the remote file could not be read, ``FETCH_ATTEMPTS`` times (transient: not the input's fault).
    """
    fs, path = filesystem_and_path(source_path)
    if is_local(fs):
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=PurePosixPath(path).suffix) as copy:
        fetch(fs, path, copy)
        yield copy.name


def fetch(fs: pafs.FileSystem, path: str, destination, attempts: int = FETCH_ATTEMPTS,
          backoff_s: float = FETCH_BACKOFF_S) -> None:
    """Copy ``path`` on ``fs`` into the open binary file ``destination``, trying ``attempts`` times in all,
    ``backoff_s`` x attempt apart. A missing file is not retried."""
    for attempt in range(1, attempts + 1):
        try:
            destination.seek(0)
            destination.truncate()
            with fs.open_input_stream(path) as remote:
                shutil.copyfileobj(remote, destination)
            destination.flush()
            return
        except FileNotFoundError:
            raise
        except OSError as error:
            if attempt == attempts:
                raise
            logger.warning("%s: read failed (%s); retrying (%d of %d)", path, error, attempt + 1, attempts)
            time.sleep(backoff_s * attempt)


def read_committed(output: str) -> tuple[dict[str, set[int]], dict[str, set[int] | None], dict[str, int]]:
    """Frames already in ``output``: ``(done, failed, sampled)``.

    ``done[video_id]`` holds committed frame indices (rows of a frame are always committed together);
    ``failed[video_id]`` holds the frame indices of recorded errors, or None when the whole input failed;
    ``sampled[video_id]`` is how many frames the sampling selected (``source_info.sampled_frames``), so
    an input whose sampled frames are all in ``done`` or ``failed`` is finished without reading it again.
    Only complete files are visible: temporary files start with a dot and are ignored.
    """
    fs, root = filesystem_and_path(output)
    done: dict[str, set[int]] = {}
    sampled: dict[str, int] = {}
    columns = {"video_id": pc.field("video_id"), "frame_index": pc.field("frame_index"),
               "sampled": pc.field("source_info", "sampled_frames")}
    for video_id, frame_index, count in _key_rows(fs, f"{root}/shards", columns):
        done.setdefault(video_id, set()).add(frame_index)
        sampled[video_id] = count
    failed: dict[str, set[int] | None] = {}
    for video_id, frames in _key_rows(fs, f"{root}/errors", ["video_id", "frame_indices"]):
        if not frames:
            failed[video_id] = None
        elif failed.get(video_id, set()) is not None:
            failed.setdefault(video_id, set()).update(frames)
    return done, failed, sampled


def _key_rows(fs: pafs.FileSystem, directory: str, columns: list[str] | dict) -> Iterator[tuple]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return
    dataset = pads.dataset(directory, format="parquet", filesystem=fs)
    if not dataset.files:
        return
    table = dataset.to_table(columns=columns)
    yield from zip(*(table.column(c).to_pylist() for c in table.column_names))


def error_files(output: str) -> set[str]:
    """Paths of the complete files in ``OUT/errors`` (temporary dot-files are not listed)."""
    fs, root = filesystem_and_path(output)
    directory = f"{root}/errors"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return set()
    return set(pads.dataset(directory, format="parquet", filesystem=fs).files)


def read_error_rows(output: str, files: set[str]) -> list[dict]:
    """The error rows of ``files`` (from `error_files`), sorted by source path and frames."""
    if not files:
        return []
    fs, _ = filesystem_and_path(output)
    rows = pads.dataset(sorted(files), format="parquet", filesystem=fs).to_table().to_pylist()
    return sorted(rows, key=lambda row: (row["source_path"], row["frame_indices"]))
