"""Write safetensors shards atomically and memory-map them back with numpy.

We read and write the format ourselves (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, raw little-endian data). Reading it so, a shard opens as a
zero-copy `np.memmap`: a store larger than RAM trains fine. Writing it so, the header is the
same bytes in every process (sorted keys, fixed separators; the safetensors library writes
``__metadata__`` in a per-process hash order), so the same tensors give the same file and
shard hashes can be compared and published. The files remain ordinary safetensors files.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from ..atomic import WriteError, write_with
from ..errors import StoreError
from .storage import ObjectPath, open_read

# stored dtype name -> (safetensors code, torch dtype, numpy dtype used to map the bytes)
DTYPES = {
    "float16": ("F16", torch.float16, np.float16),
    "bfloat16": ("BF16", torch.bfloat16, np.uint16),  # numpy has no bf16: map raw, convert in torch
    "float32": ("F32", torch.float32, np.float32),
    "int64": ("I64", torch.int64, np.int64),
}
_BY_CODE = {v[0]: k for k, v in DTYPES.items()}
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
#: what a store may keep features in, by the names users give (`--dtype`)
STORED_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def canonical_dtype(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in STORED_DTYPES.values():
        raise StoreError(f"unknown stored dtype '{name}': choose {', '.join(STORED_DTYPES)}")
    return name


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (anybind.atomic): a kill or a full disk leaves no half shard, and the
    error says what ran out and where."""
    header, order = _header(tensors, metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for name in order:
                f.write(_raw_bytes(tensors[name]))

    try:
        write_with(path, write)
    except WriteError as e:
        raise StoreError(f"{e}. Finished shards are kept: run the same command again once that is fixed, "
                         "and it resumes where it stopped.") from e


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """(the JSON header, padded to 8 bytes; tensor names in data order).

    Data is laid out by element size, largest first, then by name (as the safetensors library
    does), so every tensor starts aligned to its element size.
    """
    if sys.byteorder != "little":
        raise StoreError("safetensors shards are little-endian; this machine is big-endian")
    codes = {v[1]: v[0] for v in DTYPES.values()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise StoreError(f"tensor '{name}' has dtype {t.dtype}, which a shard does not store")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return text + b" " * (-len(text) % 8), order


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (bf16 too: numpy has no bf16, so view it as bytes)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where data starts)."""
    try:
        with open_read(path) as f:
            first = f.read(1 << 16 if isinstance(path, ObjectPath) else 8)  # remote: one GET holds most headers
            (n,) = struct.unpack("<Q", first[:8])
            text = first[8 : 8 + n]
            header = json.loads(text + f.read(n - len(text)) if len(text) < n else text)
    except (OSError, struct.error, ValueError) as e:
        raise StoreError(f"{path} is not a readable safetensors shard: {e}") from e
    return header, 8 + n


def map_tensor(path: Path, name: str, header: dict | None = None, offset: int | None = None) -> np.ndarray:
    """A read-only memory map of one tensor of a shard (bf16 comes back as raw uint16)."""
    if header is None or offset is None:
        header, offset = read_header(path)
    info = header[name]
    np_dtype = DTYPES[_BY_CODE[info["dtype"]]][2]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
        return np.zeros(shape, dtype=np_dtype)
    if isinstance(path, ObjectPath):  # no memory map over the network: rows are fetched when read
        return RemoteTensor(path, offset + begin, np.dtype(np_dtype), shape)
    return np.memmap(path, dtype=np_dtype, mode="r", offset=offset + begin, shape=shape)


class RemoteTensor:
    """One tensor of a shard on an object store, read lazily: each read fetches the rows asked
    for as ranged GETs, several at a time. Nearby rows are fetched as one range (a request costs
    more than a few hundred KiB more of one), a long range is cut in chunks fetched side by side."""

    GAP_BYTES = 256 << 10
    CHUNK_BYTES = 8 << 20
    THREADS = 8

    def __init__(self, path: ObjectPath, offset: int, dtype: np.dtype, shape: tuple):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:  # sent to a worker process: it opens its own connection
        return {**self.__dict__, "_file": None, "_pid": None}

    def _input(self):
        import os

        if self._file is None or self._pid != os.getpid():  # a forked worker opens its own
            self._file, self._pid = self.path.open_input(), os.getpid()
        return self._file

    def _fetch(self, first: int, last: int) -> np.ndarray:
        """Rows first..last (inclusive) in one ranged read."""
        nbytes = (last - first + 1) * self.row_bytes
        data = self._input().read_at(nbytes, self.offset + first * self.row_bytes)
        if len(data) != nbytes:
            raise StoreError(f"{self.path} is shorter than its header says: re-run its extraction to repair it")
        return np.frombuffer(data, dtype=self.dtype).reshape((last - first + 1, *self.shape[1:]))

    def _ranges(self, wanted: np.ndarray) -> list[tuple[int, int]]:
        """(first, last) row ranges covering the sorted unique `wanted` rows."""
        row_bytes = max(self.row_bytes, 1)
        breaks = np.nonzero(np.diff(wanted) > max(1, self.GAP_BYTES // row_bytes))[0] + 1
        chunk = max(1, self.CHUNK_BYTES // row_bytes)
        return [(lo, min(lo + chunk, int(run[-1]) + 1) - 1) for run in np.split(wanted, breaks)
                for lo in range(int(run[0]), int(run[-1]) + 1, chunk)]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        scalar = np.ndim(rows) == 0
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for {len(self)} rows")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        ranges = self._ranges(np.unique(rows))
        range_of = np.searchsorted([lo for lo, _ in ranges], rows, side="right") - 1
        order = np.argsort(range_of, kind="stable")
        bounds = np.searchsorted(range_of[order], np.arange(len(ranges) + 1))
        blocks = _pool().map(lambda r: self._fetch(*r), ranges) if len(ranges) > 1 else [self._fetch(*ranges[0])]
        for k, block in enumerate(blocks):
            sel = order[bounds[k] : bounds[k + 1]]
            out[sel] = block[rows[sel] - ranges[k][0]]
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def tolist(self) -> list:
        return self[:].tolist()


_POOL: tuple[int, object] | None = None


def _pool():
    """The threads remote reads share (made again in a forked process: threads do not fork)."""
    global _POOL
    import os
    from concurrent.futures import ThreadPoolExecutor

    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(RemoteTensor.THREADS, thread_name_prefix="anybind-s3-read"))
    return _POOL[1]
