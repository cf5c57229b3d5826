"""IDX files (the MNIST / Fashion-MNIST format): a big-endian header, then a dense array.

Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
dimension. ``.gz`` files are read transparently. Arrays are cached per process, so the
per-item image loads of ``idx://file#row`` references cost an index, not a decompression.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np

from .. import atomic
from ..errors import DataError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(blob: bytes, name: str = "IDX data") -> np.ndarray:
    """The array held by IDX bytes; DataError when the header does not match the size."""
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _DTYPES:
        raise DataError(f"{name} is not an IDX file (bad magic number)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", blob[4:header])
    dtype = np.dtype(_DTYPES[blob[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(blob) - header != expected:
        raise DataError(
            f"{name}: IDX header says {shape} ({expected} bytes) but {len(blob) - header} bytes follow"
        )
    arr = np.frombuffer(blob, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX(.gz) file (not cached; see `cached_idx`)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
        if blob[:2] == b"\x1f\x8b":
            blob = gzip.decompress(blob)
    except FileNotFoundError as exc:
        raise DataError(f"IDX file not found: {path}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    return parse_idx(blob, path)


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    return read_idx(path)


def cached_idx(path: str | os.PathLike) -> np.ndarray:
    """`read_idx`, memoised per process on (path, mtime, size): an edited file is re-read."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise DataError(f"IDX file not found: {path}") from exc
    return _cached(path, st.st_mtime_ns, st.st_size)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an IDX file (gzip when the name ends in .gz): used by tests and for small exports."""
    array = np.asarray(array)
    code = {v: k for k, v in _DTYPES.items()}.get(
        array.dtype.newbyteorder(">").str.replace("|", ">")
    )
    if code is None:
        raise DataError(f"IDX cannot hold dtype {array.dtype}")
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes()
    path = os.fspath(path)
    atomic.write_bytes(path, gzip.compress(blob, mtime=0) if path.endswith(".gz") else blob)
