"""Write safetensors shards atomically and memory-map them back with numpy.

We read the format ourselves (8-byte header length, JSON header, raw little-endian data) so a
shard opens as a zero-copy `np.memmap`: a store larger than RAM trains fine.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..atomic import WriteError, write_with
from ..errors import StoreError

# stored dtype name -> (safetensors code, torch dtype, numpy dtype used to map the bytes)
DTYPES = {
    "float16": ("F16", torch.float16, np.float16),
    "bfloat16": ("BF16", torch.bfloat16, np.uint16),  # numpy has no bf16: map raw, convert in torch
    "float32": ("F32", torch.float32, np.float32),
    "int64": ("I64", torch.int64, np.int64),
}
_BY_CODE = {v[0]: k for k, v in DTYPES.items()}
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def canonical_dtype(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ("float16", "bfloat16", "float32"):
        raise StoreError(f"unknown stored dtype '{name}': choose fp16, bf16 or fp32")
    return name


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (anybind.atomic): a kill or a full disk leaves no half shard."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except WriteError as e:
        raise StoreError(f"{e} (is the disk full?). Finished shards are kept: free space and run "
                         "the same command again.") from e


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where data starts)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
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
    return np.memmap(path, dtype=np_dtype, mode="r", offset=offset + begin, shape=shape)
