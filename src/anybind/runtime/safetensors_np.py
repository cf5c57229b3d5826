"""Reading a ``.safetensors`` file into numpy arrays, with nothing but numpy.

The format is an 8-byte little-endian header length, a JSON header ({name: dtype, shape,
data_offsets}) and the raw bytes: small enough to read here rather than add the `safetensors`
package to the torch-free runtime's four dependencies.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import AnybindError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a safetensors file (bfloat16 widened to float32); AnybindError if damaged."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        body = memoryview(raw)[8 + size :]
        return {name: _array(body, entry) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise AnybindError(f"{path} is not a readable safetensors file ({e}): export the bundle again") from e


def _array(body: memoryview, entry: dict) -> np.ndarray:
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if entry["dtype"] == "BF16":  # the high half of a float32
        wide = np.frombuffer(body[start:end], dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
    return np.frombuffer(body[start:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
