"""Where a store's files live: a local folder, or an object store (``s3://bucket/prefix``).

A local path (a laptop's disk or a shared filesystem such as NFS) stays a plain `pathlib.Path`:
the fast path, with memory maps and write-then-rename. An ``s3://`` URL is an `ObjectPath`: the
part of pathlib's interface the store code uses (``/``, name, parent, exists, stat, read_text,
glob, iterdir, unlink), over `pyarrow.fs.S3FileSystem`. On an object store

- every file is written whole, as one object (`ObjectPath.write_with`: filled locally, then one
  PUT): a reader sees the old object or the new one, never half; the manifest, written last, is
  the commit, exactly as on a disk;
- reads are ranged GETs through pyarrow's random-access files (headers, then the rows asked for);
  with ``ANYBIND_S3_READ_CACHE=DIR`` each shard is instead copied once to DIR and memory-mapped
  (for training that draws random rows over many epochs: see `cached_copy`);
- the lock is an object created with a conditional PUT (`features/lock.py`).

The endpoint comes from ``ANYBIND_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL`` (a MinIO, Ceph or moto
server); credentials from the usual AWS variables or files.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import StoreError

SCHEMES = ("s3",)


def is_url(location: Any) -> bool:
    """Whether `location` names an object store (an ObjectPath, or a string like ``s3://b/k``)."""
    return isinstance(location, ObjectPath) or (isinstance(location, str) and location.split("://", 1)[0] in SCHEMES
                                                and "://" in location)


def as_path(location: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """A local `Path`, or an `ObjectPath` for an object-store URL."""
    if isinstance(location, ObjectPath):
        return location
    if is_url(location):
        return ObjectPath.from_url(location)
    return Path(location)


def s3_endpoint() -> str | None:
    """The S3-compatible server to talk to (None: AWS itself)."""
    return os.environ.get("ANYBIND_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _filesystem(endpoint: str | None, pid: int):
    """One pyarrow S3 filesystem per endpoint and process (a forked worker makes its own)."""
    from pyarrow import fs

    options: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        options |= {"endpoint_override": host.rstrip("/"), "scheme": scheme or "https"}
    return fs.S3FileSystem(**options)


def s3_filesystem():
    return _filesystem(s3_endpoint(), os.getpid())


class ObjectPath:
    """An object (or a prefix, which stands for a folder) on an S3-compatible store."""

    def __init__(self, bucket: str, key: str = "", info=None):
        self.bucket, self.key = bucket, key.strip("/")
        self._info = info  # a FileInfo from a listing: spares a request per stat()

    @classmethod
    def from_url(cls, url: str) -> ObjectPath:
        rest = url.split("://", 1)[1]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StoreError(f"{url}: an object-store location names a bucket (s3://BUCKET/PREFIX)")
        return cls(bucket, posixpath.normpath(key) if key.strip("/") else "")

    # ---- names ---------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.bucket, posixpath.join(self.key, str(name)) if self.key else str(name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.bucket, posixpath.dirname(self.key))

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    @property
    def location(self) -> str:
        """bucket/key, as pyarrow names it."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    # ---- what is there ---------------------------------------------------------------------------
    def info(self):
        if self._info is not None:
            return self._info
        try:
            return s3_filesystem().get_file_info(self.location)
        except OSError as e:
            raise StoreError(f"could not reach {self}: {e}") from e

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self.info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self.info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self.info().type == FileType.Directory

    def stat(self) -> SimpleNamespace:
        from pyarrow.fs import FileType

        info = self.info()
        if info.type != FileType.File:
            raise FileNotFoundError(f"{self} does not exist")
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return SimpleNamespace(st_size=int(info.size), st_mtime=mtime)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store's folders are the prefixes of its objects."""

    def iterdir(self) -> Iterator[ObjectPath]:
        yield from self._listing(recursive=False)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects and prefixes below this one matching `pattern` (fnmatch, one level per '/')."""
        depth = pattern.count("/") + 1
        for found in sorted(self._listing(recursive=depth > 1)):
            relative = found.key[len(self.key) + 1 :] if self.key else found.key
            if relative.count("/") == depth - 1 and fnmatch.fnmatchcase(relative, pattern):
                yield found

    def _listing(self, recursive: bool) -> list[ObjectPath]:
        from pyarrow.fs import FileSelector

        selector = FileSelector(self.location, allow_not_found=True, recursive=recursive)  # a LIST, paged
        try:
            infos = s3_filesystem().get_file_info(selector)
        except OSError as e:
            raise StoreError(f"could not list {self}: {e}") from e
        return [ObjectPath(self.bucket, i.path.split("/", 1)[1], i) for i in infos]

    # ---- reading ---------------------------------------------------------------------------------
    def open_input(self):
        """A random-access pyarrow file: each read is a ranged GET."""
        try:
            return s3_filesystem().open_input_file(self.location)
        except FileNotFoundError:
            raise
        except OSError as e:
            if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
                raise FileNotFoundError(f"{self} does not exist") from e
            raise

    def read_bytes(self) -> bytes:
        with self.open_input() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # ---- writing ---------------------------------------------------------------------------------
    def write_with(self, write: Callable[[Path], Any]) -> ObjectPath:
        """Fill a local temporary file with ``write(tmp)``, then PUT it whole as this object.

        The bytes go in one write call: pyarrow sends a small object as one PUT and a large one as
        a multipart upload, which becomes visible only when it completes; a writer killed before
        that leaves the old object (or none).
        """
        from ..atomic import WriteError, explain

        with tempfile.TemporaryDirectory(prefix="anybind-put-") as tmpdir:
            tmp = Path(tmpdir) / self.name
            try:
                write(tmp)
            except OSError as e:
                raise WriteError(f"could not write {self} (staged in {tmp}): {explain(e)}") from e
            data = tmp.read_bytes()
        try:
            with s3_filesystem().open_output_stream(self.location) as out:
                out.write(data)
        except OSError as e:
            raise WriteError(f"could not write {self}: {e}") from e
        self._info = None
        return self

    def write_bytes(self, data: bytes) -> ObjectPath:
        return self.write_with(lambda tmp: tmp.write_bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> ObjectPath:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            s3_filesystem().delete_file(self.location)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._info = None

    def rmtree(self) -> None:
        s3_filesystem().delete_dir_contents(self.location, missing_dir_ok=True)


# ---- the local read cache (optional) ---------------------------------------------------------------
def read_cache_dir() -> Path | None:
    """$ANYBIND_S3_READ_CACHE: where remote shards are copied once and memory-mapped (unset: none)."""
    folder = os.environ.get("ANYBIND_S3_READ_CACHE")
    return Path(folder).expanduser() if folder else None


def cached_copy(path: ObjectPath, folder: Path) -> Path:
    """A local copy of an object, downloaded once. Named by the object's URL, size and time, so a
    rewritten object (a repaired shard) is fetched again; written atomically, so a copy is whole."""
    import hashlib
    import shutil

    from ..atomic import write_with

    info = path.info()
    tag = hashlib.sha256(f"{path}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    local = folder / f"{tag}-{path.name}"
    if local.is_file() and local.stat().st_size == info.size:
        return local
    folder.mkdir(parents=True, exist_ok=True)

    def download(tmp: Path) -> None:
        with s3_filesystem().open_input_stream(path.location) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    return write_with(local, download)


# ---- the same operations on either kind of path ---------------------------------------------------------
def open_read(path: Path | ObjectPath):
    """A binary file for reading (read, seek): a local file, or a pyarrow random-access one."""
    return path.open_input() if isinstance(path, ObjectPath) else open(path, "rb")


def arrow_source(path: Path | ObjectPath):
    """What pyarrow.parquet reads: a local path as it is, an object as a random-access file."""
    return path.open_input() if isinstance(path, ObjectPath) else path


def rmtree(path: Path | ObjectPath) -> None:
    import shutil

    path.rmtree() if isinstance(path, ObjectPath) else shutil.rmtree(path)
