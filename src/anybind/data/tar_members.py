"""Random access to members of uncompressed tar shards (WebDataset), cheap per item.

A shard's member table (name -> data offset, size) is listed once per process with
`tarfile`; a member is then read with one positional read (`os.pread`) on a file descriptor
kept open per process. pread has no shared file position, so forked workers that inherit a
descriptor can never disturb each other; descriptors are still reopened after a fork.
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections import OrderedDict

from ..errors import DataError

MAX_OPEN_SHARDS = 32


@functools.lru_cache(maxsize=256)
def _members(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    try:
        with tarfile.open(path, mode="r:") as tf:
            return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
    except tarfile.ReadError as exc:
        raise DataError(
            f"{path} is not an uncompressed tar file ({exc}); compressed shards (.tar.gz) "
            "allow no random access: decompress them first"
        ) from exc


def list_members(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of regular files, memoised on (path, mtime, size)."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise DataError(f"tar shard not found: {path}") from exc
    return _members(path, st.st_mtime_ns, st.st_size)


class _Descriptors:
    """A small LRU of open read-only descriptors, owned by one process."""

    def __init__(self, capacity: int = MAX_OPEN_SHARDS):
        self.capacity, self.pid, self.fds = capacity, os.getpid(), OrderedDict()

    def get(self, path: str) -> int:
        if self.pid != os.getpid():  # forked: the parent's table is not ours to use or close
            self.pid, self.fds = os.getpid(), OrderedDict()
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.fds[path] = fd
        if len(self.fds) > self.capacity:
            _, old = self.fds.popitem(last=False)
            os.close(old)
        return fd


_DESCRIPTORS = _Descriptors()


def read_member(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of one member of a tar shard; DataError when the shard or member is missing."""
    path = os.path.abspath(os.fspath(path))
    members = list_members(path)
    if name not in members:
        raise DataError(f"tar shard {path} has no member '{name}'")
    offset, size = members[name]
    fd = _DESCRIPTORS.get(path)
    if hasattr(os, "pread"):
        blob = os.pread(fd, size, offset)
    else:  # Windows: no pread; descriptors are per process there (spawn), so seek+read is safe
        os.lseek(fd, offset, os.SEEK_SET)
        blob = os.read(fd, size)
    if len(blob) != size:
        raise DataError(f"tar member '{name}' of {path} is truncated ({len(blob)} of {size} bytes)")
    return blob
