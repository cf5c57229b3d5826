"""Stable hashes: of JSON-able objects (cache keys) and of weight files (memoised by size+mtime)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import atomic


def hash_obj(obj, n: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`, first `n` hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _memo_path() -> Path:
    from .config import cache_root

    return cache_root() / "file-hashes.json"


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; memoised on (path, size, mtime) so big weights hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    memo[key] = digest
    try:  # best effort: a read-only cache only costs a re-hash
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(memo_file, memo, indent=None)
    except OSError:  # WriteError is an OSError too
        pass
    return digest


def hash_files(paths) -> str:
    """One hash over several weight files (names and contents)."""
    paths = sorted(Path(p) for p in paths)
    return hash_obj([[p.name, hash_file(p)] for p in paths])


def hash_dir(directory: str | os.PathLike, patterns=("*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "*.json", "*.txt", "*.model")) -> str:
    """Hash the weight and config files of a model folder (recursively)."""
    directory = Path(directory)
    files = sorted({p for pat in patterns for p in directory.rglob(pat) if p.is_file()})
    return hash_obj([[str(p.relative_to(directory)), hash_file(p)] for p in files])
