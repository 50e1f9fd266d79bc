"""List the inputs of a run, give each a stable unique id, and read what earlier runs already committed."""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import PurePosixPath
from urllib.parse import quote, unquote, urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"}
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
TABLE_EXTENSIONS = frozenset({".parquet", ".csv"})
PATH_COLUMN = "path"
GLOB_CHARACTERS = "*?["
LOCAL = "local"  # the key of the local filesystem in `Listing.filesystems`
# Recorded in every shard's metadata: outputs made under another rule must not be mixed.
VIDEO_ID_RULE = "stem-sha256/128 of the canonical URI"
FETCH_ATTEMPTS = 3  # reads of a remote input before its failure is the run's (transient), never the input's
FETCH_BACKOFF_S = 2.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputItem:
    """One input of a run: a file, named once however many times (and ways) it was listed."""

    video_id: str  # `make_video_id` of the file's canonical URI (`canonical_uri`)
    source_path: str  # recorded in the shards: an absolute local path, or a percent-encoded URI without options
    path: str  # what opens it on ``Listing.filesystems[filesystem]``
    filesystem: str = LOCAL
    problem: str = ""  # why it cannot be read at all (its error row's reason); empty for a readable name


@dataclass
class Listing:
    """What ``--input`` names: the inputs, the filesystems that open them, and what was left out and why."""

    items: list[InputItem]
    filesystems: dict[str, pafs.FileSystem]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (name as listed, source_path it repeats)
    notes: list[str] = field(default_factory=list)  # everything else skipped, one line each


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def make_video_id(canonical: str) -> str:
    """``<stem>-<first 32 hex digits (128 bits) of SHA-256 of canonical>``: readable, and unique in practice.

    ``canonical`` is a file's canonical URI (`canonical_uri`), so the id does not depend on how the
    file was named: ``x``, ``./x``, ``//x``, its folder or a list file all give the same id."""
    name = unquote(PurePosixPath(urlsplit(canonical).path).stem)
    stem = re.sub(r"[^\w.-]+", "_", name)[:48].strip("_") or "input"
    return f"{stem}-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


def canonical_uri(scheme: str, path: str, host: str = "") -> str:
    """The canonical URI of ``path``: ``file://`` + its real path (symlinks resolved, ``.``/``..``/``//``
    collapsed), or ``scheme://`` + the filesystem path (bucket and key), percent-encoded (RFC 3986;
    a local name's bytes exactly, also when they are not UTF-8); never any filesystem option."""
    if scheme == "file":
        return "file://" + quote(os.fsencode(os.path.realpath(path)), safe="/")
    return f"{scheme}://{host}{quote(path, safe='/')}"


def local_path(base: str, name: str) -> str:
    """``name`` (absolute, or relative to ``base``) as an absolute path that opens the same file.

    ``.`` and repeated ``/`` are dropped as text; ``..`` is not: after a symbolic link it is the
    parent of the link's target, so a path holding ``..`` has its folder resolved (`os.path.realpath`).
    """
    path = os.path.join(base, name)
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        folder, last = os.path.split(path.rstrip("/"))
        return os.path.realpath(path) if last == ".." else os.path.join(os.path.realpath(folder), last)
    return "/" + "/".join(parts)


def redact_credentials(text: str) -> str:
    """``text`` with the user and password of every URI in it (``s3://KEY:SECRET@bucket``) replaced by ``***``."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@", r"\1***@", text)


def list_inputs(spec: str, media: str) -> Listing:
    """Expand ``--input`` to the run's inputs, each real file once.

    ``spec`` is a local path or a URI (``scheme://bucket/key?pyarrow-options``, percent-encoded; a space
    or a non-ASCII character is taken as itself). A path that exists is a file or a directory, whatever
    characters its name has; only a name that does not exist is a glob (``*``, ``?``, ``[...]`` within a
    name, ``**`` for any number of folders; the longest existing leading folder is taken literally).
    Directories (and globs) are searched recursively for ``media``'s extensions, skipping names that
    start with a dot (unless a pattern names them), following symbolic links but never into a
    directory already listed; an entry that cannot be examined or is not a regular file is a note
    (`Listing.notes`). Relative paths are relative to the working directory; ``~`` is expanded;
    ``..`` is resolved as the kernel does (`local_path`). A text file
    (``.txt``/``.lst``) or a table (``.parquet``/``.csv`` with a ``path`` column) lists one input per
    line or row (format: `read_list_file`, `read_path_table`); a single other file is one input.

    Raises:
        FileNotFoundError: ``spec`` neither exists nor is a glob.
        ValueError: ``spec`` is not a URI pyarrow can open, or a table has no ``path`` column.
        OSError: the listing itself failed (permissions, network).
    """
    lister = _Lister(VIDEO_EXTENSIONS if media == "video" else IMAGE_EXTENSIONS)
    lister.add_spec(spec)
    return lister.listing()


class _Lister:
    """Collects inputs from the named places, each real file once (by canonical URI)."""

    def __init__(self, extensions: frozenset[str]) -> None:
        self.extensions = extensions
        self.filesystems: dict[str, pafs.FileSystem] = {LOCAL: pafs.LocalFileSystem()}
        self._fs_keys: dict[tuple[str, str, str], tuple[str, str]] = {}  # (scheme, netloc, query) → key, root
        self._schemes: dict[str, str] = {LOCAL: "file"}
        self._hosts: dict[str, str] = {LOCAL: ""}
        self.items: dict[str, InputItem] = {}  # canonical → item
        self.ids: dict[str, str] = {}  # video_id → canonical
        self.duplicates: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def listing(self) -> Listing:
        return Listing(list(self.items.values()), self.filesystems, self.duplicates, self.notes)

    def locate(self, name: str, like: str | None = None) -> tuple[str, str]:
        """(filesystem key, path) of ``--input`` (``like`` None: ``~`` is expanded) or of a URI listed in
        a list file on ``like``; a URI's options pick (and name) its filesystem.

        A URI without options or credentials on the same filesystem kind as ``like`` is opened with
        ``like``'s filesystem: a list on a MinIO server names objects on that server.

        Raises:
            ValueError: the URI has a fragment (``#``: write ``%23`` in a name) or pyarrow cannot open it.
        """
        if "://" not in name:
            return LOCAL, local_path(os.getcwd(), os.path.expanduser(name) if like is None else name)
        parts = urlsplit(name)
        if parts.fragment:
            raise ValueError(f"{redact_credentials(name)!r}: a URI cannot hold '#' (it starts a fragment); "
                             "write it as %23")
        path = unquote(parts.path)
        if parts.scheme == "file":
            if parts.query:
                raise ValueError(f"{redact_credentials(name)!r}: a file URI takes no options (?{parts.query})")
            return LOCAL, local_path("/", path)
        if like not in (None, LOCAL) and parts.scheme == self._schemes[like] and not parts.query \
                and "@" not in parts.netloc:
            if not self._hosts[like]:  # s3://bucket/key: the bucket is part of the path
                return like, f"{parts.netloc}{path}".rstrip("/")
            if parts.netloc == self._hosts[like]:
                return like, path
        identity = (parts.scheme, parts.netloc, parts.query)
        if identity not in self._fs_keys:
            query = f"?{parts.query}" if parts.query else ""
            fs, root = pafs.FileSystem.from_uri(f"{parts.scheme}://{parts.netloc}{query}")
            key = f"fs{len(self._fs_keys)}"
            self._fs_keys[identity] = (key, root.rstrip("/"))
            self.filesystems[key] = fs
            self._schemes[key] = parts.scheme
            self._hosts[key] = "" if root else parts.netloc.rpartition("@")[2]  # hdfs://host:port: a host, not a bucket
        key, root = self._fs_keys[identity]
        return key, f"{root}{path}".rstrip("/") if root else path

    def add(self, key: str, path: str, listed_as: str) -> None:
        """One named file: kept once by its canonical URI; a repeat is recorded in ``duplicates``."""
        canonical = canonical_uri(self._schemes[key], path, self._hosts[key])
        if canonical in self.items:
            self.duplicates.append((listed_as, self.items[canonical].source_path))
            return
        video_id = make_video_id(canonical)
        if self.ids.setdefault(video_id, canonical) != canonical:
            raise ValueError(f"two inputs have the same video_id {video_id}: {self.ids[video_id]} and {canonical}")
        problem = ""
        if key == LOCAL:
            source_path = os.fsencode(path).decode("utf-8", "backslashreplace")
            if source_path != path:
                problem = ("the path is not valid UTF-8 (its undecodable bytes are shown as \\xNN): rename the "
                           "file to encode it (or, if a list file named it, save the list as UTF-8)")
                path = ""  # never opened; a surrogate would not survive Arrow
        else:
            source_path = canonical
        self.items[canonical] = InputItem(video_id, source_path, path, key, problem)

    def add_spec(self, spec: str) -> None:
        key, path = self.locate(spec)
        kind = self.file_type(key, path)
        if kind == pafs.FileType.Directory:
            self.add_tree(key, path)
        elif kind == pafs.FileType.File:
            self.add_named_file(key, path, spec)
        elif any(ch in path for ch in GLOB_CHARACTERS):
            self.add_glob(key, path)
        else:
            raise FileNotFoundError(f"--input {redact_credentials(spec)!r} does not exist (and is not a glob: no * ? or [ in it)")

    def file_type(self, key: str, path: str) -> pafs.FileType:
        """File, Directory or NotFound (local: `os.stat`, which takes any name, UTF-8 or not)."""
        if key != LOCAL:
            return self.filesystems[key].get_file_info(path).type
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            return pafs.FileType.NotFound
        return pafs.FileType.Directory if stat.S_ISDIR(mode) else pafs.FileType.File

    def add_named_file(self, key: str, path: str, spec: str) -> None:
        suffix = PurePosixPath(path).suffix.lower()
        if suffix in LIST_EXTENSIONS:
            self.add_list_file(key, path)
        elif suffix in TABLE_EXTENSIONS:
            self.add_path_table(key, path, spec)
        else:
            self.add(key, path, spec)

    def add_tree(self, key: str, root: str, pattern: list[str] | None = None) -> None:
        """Every file under ``root`` with a media extension (and matching ``pattern``'s components, if given)."""
        depth = None if pattern is None or "**" in pattern else len(pattern)
        hidden = pattern is not None and any(part.startswith(".") for part in pattern)
        for path in self.walk(key, root, depth, hidden):
            relative = path[len(root):].lstrip("/").split("/")
            if PurePosixPath(path).suffix.lower() not in self.extensions:
                continue
            if pattern is None or _match(pattern, relative):
                self.add(key, path, path)

    def add_glob(self, key: str, path: str) -> None:
        parts = path.split("/")
        fixed = 1  # leading components that exist are taken literally, even with [ ] in their names
        while fixed < len(parts) and self.file_type(key, "/".join(parts[: fixed + 1]) or "/") == pafs.FileType.Directory:
            fixed += 1
        root = "/".join(parts[:fixed]) or "/"
        self.add_tree(key, root, parts[fixed:])

    def walk(self, key: str, root: str, depth: int | None, hidden: bool = False) -> Iterator[str]:
        """Files under ``root`` (at most ``depth`` levels down), sorted per directory, skipping dot-names
        unless ``hidden``. An entry that cannot be examined, or is neither a file nor a folder (a FIFO,
        a socket, a device, a link in a loop), is a note."""
        if key != LOCAL:
            selector = pafs.FileSelector(root, recursive=depth != 1)
            for info in sorted(self.filesystems[key].get_file_info(selector), key=lambda i: i.path):
                parts = info.path[len(root):].lstrip("/").split("/")
                if (info.type == pafs.FileType.File and (depth is None or len(parts) <= depth)
                        and (hidden or not any(part.startswith(".") for part in parts))):
                    yield info.path
            return
        seen: set[tuple[int, int]] = set()
        stack = [(root, 1)]
        while stack:
            directory, level = stack.pop()
            try:
                status = os.stat(directory)
                if (status.st_dev, status.st_ino) in seen:
                    self.notes.append(f"{directory}: the same folder as one already listed (a link); not listed again")
                    continue
                seen.add((status.st_dev, status.st_ino))
                with os.scandir(directory) as scan:
                    entries = sorted(scan, key=lambda e: e.name)
            except OSError as error:
                self.notes.append(f"{directory}: cannot be listed ({error.strerror or error}); its files are not inputs")
                continue
            subdirectories = []
            for entry in entries:
                if entry.name.startswith(".") and not hidden:
                    continue
                try:
                    if entry.is_dir():
                        if depth is None or level < depth:
                            subdirectories.append((entry.path, level + 1))
                    elif entry.is_file() or not os.path.lexists(os.path.realpath(entry.path)):
                        yield entry.path  # a dangling link too: its error row says the file is missing
                    else:
                        self.notes.append(f"{entry.path}: not a regular file")
                except OSError as error:
                    self.notes.append(f"{entry.path}: cannot be examined ({error.strerror or error})")
            stack.extend(reversed(subdirectories))

    def add_list_file(self, key: str, path: str) -> None:
        for line in read_list_file(self.filesystems[key], path):
            number, name, problem = line.number, line.name, line.problem
            where = f"{path}:{number}"
            if line.comment:
                named = os.path.join(os.path.dirname(path), name)
                if key == LOCAL and os.path.lexists(named):
                    self.notes.append(f"{where}: {name!r} is a comment, but a file of that name exists; "
                                      f"write it as ./{name} to list it")
                continue
            if problem:
                self.notes.append(f"{where}: {problem}")
                continue
            self.add_listed(key, path, name, where)

    def add_path_table(self, key: str, path: str, spec: str) -> None:
        for number, name in read_path_table(self.filesystems[key], path, spec):
            where = f"{path} row {number}"
            if not name.strip():
                self.notes.append(f"{where}: no path")
                continue
            self.add_listed(key, path, name, where)

    def add_listed(self, key: str, list_path: str, name: str, where: str) -> None:
        """A name from a list or a table: a URI, an absolute path, or a path relative to the list's own
        folder; one that cannot be a location (a URI pyarrow refuses) is a note naming ``where``."""
        try:
            if "://" in name:
                key, path = self.locate(name, like=key)
            elif key == LOCAL:
                path = local_path(os.path.dirname(list_path), name)
            elif name.startswith("/"):
                raise ValueError(f"{name!r}: a list on {self._schemes[key]}:// names objects by URI or by a path "
                                 "relative to the list's folder, not by an absolute path")
            else:
                path = posixpath.normpath(posixpath.join(posixpath.dirname(list_path), name))
        except ValueError as error:
            self.notes.append(f"{where}: {error}")
            return
        except OSError as error:  # the filesystem a URI names cannot be reached: the run's problem, not the line's
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OSError(f"{where}: cannot reach the filesystem of {redact_credentials(name)!r}: {first}") from error
        self.add(key, path, where)


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Glob match by path component: ``**`` spans any number of folders, other components are `fnmatchcase`.
    As in a shell, a name that starts with a dot is matched only by a component that starts with one."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        spans = next((i for i, part in enumerate(parts) if part.startswith(".")), len(parts))
        return any(_match(pattern[1:], parts[i:]) for i in range(spans + 1))
    return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and (pattern[0].startswith(".") or not parts[0].startswith(".")) and _match(pattern[1:], parts[1:]))


class ListLine(NamedTuple):
    number: int  # from 1
    name: str  # the path or URI as written (a comment: its text, with the #)
    problem: str = ""  # why the line names no input
    comment: bool = False


def read_list_file(fs: pafs.FileSystem, path: str) -> Iterator[ListLine]:
    """Each line of a list file that is not blank.

    Format: UTF-8 (a leading byte-order mark is dropped), one path or URI per line, ``\\n`` or
    ``\\r\\n`` line ends. A line is taken exactly as written, spaces included; a blank line (only
    whitespace) is skipped; a line whose first character is ``#`` is a comment (write a name that
    starts with ``#`` as ``./#name``). Relative paths are relative to the list file's folder. A local
    name that is not valid UTF-8 is passed on as its bytes (``os.fsdecode``); a URI must be text.
    """
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(f"{path} is UTF-16 (as Windows PowerShell writes by default): save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        if b"\0" in raw:
            yield ListLine(number, "", f"holds a NUL byte (a binary or UTF-16 file?): {raw[:80]!r}")
            continue
        try:
            yield ListLine(number, raw.decode("utf-8"), comment=raw.startswith(b"#"))
        except UnicodeDecodeError:
            if raw.startswith(b"#"):
                yield ListLine(number, os.fsdecode(raw), comment=True)
            elif b"://" in raw or not is_local(fs):
                yield ListLine(number, "", f"not valid UTF-8: {raw!r}")
            else:
                yield ListLine(number, os.fsdecode(raw))


def read_path_table(fs: pafs.FileSystem, path: str, spec: str) -> Iterator[tuple[int, str]]:
    """``(row number, name)`` for each row of a Parquet or CSV table's ``path`` column (from 1).

    The column may be string, large string, string view, dictionary-encoded or binary (binary values
    that are not UTF-8 are local names, `os.fsdecode`); a null is an empty name.

    Raises:
        ValueError: the table has no ``path`` column, or it holds neither text nor bytes.
    """
    with fs.open_input_file(path) as handle:
        if path.lower().endswith(".parquet"):
            names = pq.read_schema(handle).names
            table = pq.read_table(handle, columns=[PATH_COLUMN]) if PATH_COLUMN in names else None
        else:
            options = pacsv.ConvertOptions(column_types={PATH_COLUMN: pa.string()})
            try:
                table = pacsv.read_csv(handle, convert_options=options)
            except pa.ArrowInvalid as error:
                raise ValueError(f"--input {redact_credentials(spec)!r} cannot be read as CSV: {error}") from error
            names = table.column_names
    if PATH_COLUMN not in names:
        raise ValueError(f"--input {redact_credentials(spec)!r} has no {PATH_COLUMN!r} column (columns: {names})")
    column = table.column(PATH_COLUMN)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if not any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
                                         pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)):
        raise ValueError(f"--input {redact_credentials(spec)!r}: its {PATH_COLUMN!r} column is {column.type}, not text or bytes")
    for number, value in enumerate(column.to_pylist(), start=1):
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        if value and "\0" in value:
            value = ""  # no file name holds a NUL byte
        yield number, value or ""


@contextlib.contextmanager
def local_file(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """A local path for ``path`` on ``fs``: itself when local, else a temporary copy (`fetch`), made once.

    Raises:
        FileNotFoundError: the file does not exist (it was listed, then removed; or a link to nothing).
        IsADirectoryError: it is a folder (or a bucket).
        OSError: the remote file could not be read, ``FETCH_ATTEMPTS`` times (transient: not the input's fault).
    """
    if is_local(fs):
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not a file")
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=PurePosixPath(path).suffix) as copy:
        fetch(fs, path, copy)
        yield copy.name


def fetch(fs: pafs.FileSystem, path: str, destination, attempts: int = FETCH_ATTEMPTS,
          backoff_s: float = FETCH_BACKOFF_S) -> None:
    """Copy ``path`` on ``fs`` into the open binary file ``destination``, trying ``attempts`` times in all,
    ``backoff_s`` x attempt apart. A missing file, or a folder, is not retried.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder (or a bucket): found out only when a read fails.
        OSError: the last attempt's error.
    """
    for attempt in range(1, attempts + 1):
        try:
            destination.seek(0)
            destination.truncate()
            with fs.open_input_stream(path) as remote:
                shutil.copyfileobj(remote, destination)
            destination.flush()
            return
        except OSError as error:  # an object store says "not found" for a prefix: a folder is checked first
            if _is_folder(fs, path):
                raise IsADirectoryError(f"{path} is a folder, not a file") from error
            if isinstance(error, FileNotFoundError) or attempt == attempts:
                raise
            logger.warning("%s: read failed (%s); retrying (%d of %d)", path, error, attempt + 1, attempts)
            time.sleep(backoff_s * attempt)


def _is_folder(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is a folder; False when that cannot be told either (the read failure stands)."""
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except OSError:
        return False
