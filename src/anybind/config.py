"""Where anybind keeps its caches (feature stores, dataset indexes, weight hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_location(override: str | os.PathLike | None = None) -> str | Path:
    """The configured cache root as given: `override`, else $ANYBIND_CACHE, else ~/.cache/anybind.

    A local path (expanded), or an object-store URL (``s3://bucket/prefix``, kept a string), where
    the feature stores then live (`anybind.features.store.stores_dir`)."""
    root = override or os.environ.get("ANYBIND_CACHE") or Path.home() / ".cache" / "anybind"
    return str(root) if "://" in str(root) else Path(root).expanduser()


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The local cache root: the configured one when it is a local path.

    When it names an object store, only the feature stores live there; the small caches that
    stay beside the data being read (dataset listings, the precision memo, file hashes, models)
    stay on this machine, in $ANYBIND_LOCAL_CACHE, else ~/.cache/anybind.
    """
    root = cache_location(override)
    if isinstance(root, str):
        return Path(os.environ.get("ANYBIND_LOCAL_CACHE") or Path.home() / ".cache" / "anybind").expanduser()
    return root
