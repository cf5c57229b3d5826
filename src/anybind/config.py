"""Where anybind keeps its caches (feature stores, dataset indexes, weight hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """`override`, else $ANYBIND_CACHE, else ~/.cache/anybind."""
    root = override or os.environ.get("ANYBIND_CACHE") or Path.home() / ".cache" / "anybind"
    return Path(root).expanduser()
