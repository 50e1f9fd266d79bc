"""An output's storage: files published whole, listed, read back with their page CRCs checked, and the one
fenced writer (`Store`) every write of a run goes through.

**Publishing.** A file is published whole (`publish`): on a local disk it is written under a temporary
dot-name, ``fsync``-ed and renamed, so a crash cannot leave a truncated file under a committed name; on
an object store a single upload is atomic by itself (S3 makes an object visible only when its upload
completes) and no rename (a copy of every byte there) is needed. Every Parquet page carries a CRC
(`parquet_bytes`), checked whenever a file is read (`read_verified`).

**Fencing.** A `Store` holds the fence of the run's lease (`pipeline.lease.Fence`) and checks it before
every write and delete: a job whose lease another job took over stops writing instead of writing beside
the new holder. The check and the write are two steps, so a job that loses its lease between them can
still publish that one file.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.errors import first_line
from pipeline.inputs import filesystem_and_path, is_local, redact_credentials

TEMP_PREFIX = ".tmp-"  # files being written; a killed run's leftovers are removed by the next lease holder
DAMAGED = "damaged"  # OUT/damaged/<sub>/<name>: files set aside by --set-aside-damaged
# The columns written with statistics (readers skip row groups by them).
KEY_COLUMNS = ["video_id", "frame_index", "tile_index"]
# What reading a damaged Parquet file raises: I/O and Arrow errors, and a UnicodeDecodeError (a ValueError) when
# a column name in its footer no longer decodes.
UNREADABLE = (OSError, ValueError, pa.ArrowException)
# Datasets of the output's files read with each page checked against its CRC (see `read_verified`).
VERIFIED_PARQUET = pads.ParquetFileFormat(
    default_fragment_scan_options=pads.ParquetFragmentScanOptions(page_checksum_verification=True))


class DamagedOutputError(Exception):
    """Committed files of the output cannot be read back whole: ``damaged`` maps each to what is wrong."""

    def __init__(self, output: str, damaged: dict[str, str]) -> None:
        lines = [f"{path}: {reason}" for path, reason in sorted(damaged.items())]
        listed = "".join(f"\n  {line}" for line in lines[:20])
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        where = redact_credentials(output)
        super().__init__(f"{where} has {len(lines)} damaged file(s):{listed}{more}\nRun again with "
                         f"--set-aside-damaged to move them to {DAMAGED}/ and encode their frames again.")
        self.damaged = damaged


# -- publishing and naming -------------------------------------------------------------------------


def publish(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Make ``data`` the content of ``path`` at once: readers see the old file or the whole new one.

    Local: written to a temporary dot-file beside it (the folder made if missing), ``fsync``-ed, renamed,
    and the folder ``fsync``-ed, so after a node crash the name holds either nothing or every byte.
    Object store: one upload, which the store makes visible only once complete.

    Raises:
        OSError: the file cannot be written.
    """
    if not is_local(fs):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}-{os.path.basename(path)}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(folder)


def sync_folder(folder: str) -> None:
    """``fsync`` a local folder, so the names just made or removed in it survive a node crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def parquet_bytes(table: pa.Table, **options) -> bytes:
    """``table`` as a Parquet file (zstd, key statistics, a CRC per page so damage inside a file is
    found when it is read: `read_verified`), in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True,
                   write_statistics=[name for name in KEY_COLUMNS if name in table.column_names], **options)
    return sink.getvalue()


def key_name(table: pa.Table, key_columns: list[str]) -> str:
    """``part-<hash of the rows' keys>.parquet``: a write that Ray retries replaces its own file."""
    digest = hashlib.sha1()
    for name in key_columns:
        digest.update(repr(table[name].to_pylist()).encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"


# -- listing and reading ---------------------------------------------------------------------------


def list_files(fs: pafs.FileSystem, directory: str, suffix: str = "") -> list[pafs.FileInfo]:
    """The files of ``directory`` whose names end with ``suffix``, sorted by path: no temporary or other
    dot-files, no folders; a missing folder lists nothing."""
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory))
    return sorted((info for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
                   and not info.base_name.startswith(".")), key=lambda info: info.path)


def committed_files(fs: pafs.FileSystem, root: str, sub: str) -> list[str]:
    """The complete Parquet files of ``<root>/<sub>`` (``shards``, ``index`` or ``errors``), sorted. (For
    ``shards`` this is what is on disk, committed or not; the index says which are committed.)"""
    return [info.path for info in list_files(fs, f"{root}/{sub}", ".parquet")]


def method_folders(fs: pafs.FileSystem, root: str) -> list[str]:
    """The sub-folders of ``root`` holding a run record (``manifest.json``), sorted: one output per method
    of a run with several (`--method a,b`). A missing ``root`` has none."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(root))
                  if info.type == pafs.FileType.Directory
                  and fs.get_file_info(f"{info.path}/manifest.json").type == pafs.FileType.File)


def read_verified(handle: pa.NativeFile, **options) -> pq.ParquetFile:
    """A Parquet file whose pages are checked against their CRCs as they are read (files written
    before page CRCs have none to check)."""
    return pq.ParquetFile(handle, page_checksum_verification=True, **options)


def read_whole(fs: pafs.FileSystem, path: str) -> pa.Table | str | None:
    """The Parquet table at ``path``; None when it is gone; else why it cannot be read (its first line)."""
    try:
        with fs.open_input_file(path) as handle:
            return read_verified(handle).read()
    except FileNotFoundError:
        return None
    except UNREADABLE as error:
        return first_line(error, 1000)


def unreadable_files(fs: pafs.FileSystem, files: list[str]) -> dict[str, str]:
    """{file: reason} for each of ``files`` that cannot be read whole (page CRCs checked), or is gone."""
    reasons = {path: read_whole(fs, path) for path in files}
    return {path: reason or "missing" for path, reason in reasons.items() if not isinstance(reason, pa.Table)}


def read_parquet_files(fs: pafs.FileSystem, files: list[str], schema: pa.Schema, output: str) -> pa.Table:
    """The rows of ``files`` (each page checked against its CRC) as one table of ``schema`` (a column a
    file lacks is null there).

    Raises:
        DamagedOutputError: naming each of ``files`` that cannot be read.
    """
    try:
        return pads.dataset(files, format=VERIFIED_PARQUET, filesystem=fs, schema=schema).to_table()
    except UNREADABLE as error:
        bad = unreadable_files(fs, files) or {os.path.dirname(files[0]): str(error)}  # else: the folder read
        raise DamagedOutputError(output, bad) from error


# -- the fenced writer -----------------------------------------------------------------------------


class Store:
    """The writer of one output: every write and delete checks ``fence`` first (`pipeline.lease.Fence`;
    None only for reading and for tests that hold no lease). Picklable: write tasks get a copy.

    Args:
        output: the output's directory or URI (credentials and options included).
        fence: raises `pipeline.lease.LeaseLost` from ``check()`` once the run no longer holds the output.
    """

    def __init__(self, output: str, fence=None) -> None:
        self.output = output
        self.fence = fence
        self.fs, self.root = filesystem_and_path(output)

    def __getstate__(self) -> dict:
        return {"output": self.output, "fence": self.fence}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["output"], state["fence"])

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def check(self) -> None:
        """Raise `pipeline.lease.LeaseLost` unless this run still holds the output."""
        if self.fence is not None:
            self.fence.check()

    def publish(self, relative: str, data: bytes) -> str:
        """Publish ``data`` as ``<output>/<relative>`` (`publish`) after checking the fence; returns its path."""
        self.check()
        path = self.path(relative)
        publish(self.fs, path, data)
        return path

    def delete(self, path: str) -> None:
        """Delete ``path`` (a path under the output) after checking the fence; gone already is fine."""
        self.check()
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def move(self, path: str, folder: str) -> None:
        """Move ``path`` into ``<output>/<folder>/`` after checking the fence."""
        self.check()
        target = self.path(folder)
        self.fs.create_dir(target, recursive=True)
        self.fs.move(path, f"{target}/{os.path.basename(path)}")

    def make_folders(self, *relatives: str) -> None:
        for relative in relatives:
            self.fs.create_dir(self.path(relative), recursive=True)
