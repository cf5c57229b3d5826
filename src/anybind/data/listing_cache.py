"""The dataset listing cache: a listed index is saved as Parquet and reused while its source is unchanged.

Key = hash of (spec, options, lister version, a cheap stamp of the source). The stamp is the
size and mtime of a file, or of every file under a directory (one `stat` each: listing 8,121
openclipart files costs ~20 ms, re-reading their SVGs ~2 s), so an edited table re-lists and
an untouched one loads at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._hashing import hash_obj
from ..checks import slug
from ..config import cache_root
from .index import INDEX_VERSION, DatasetIndex


def source_stamp(paths: list[str | os.PathLike]) -> list:
    """[(path, size, mtime_ns)] for files, and for every file under directories; missing -> None."""
    stamp = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            st = p.stat()
            stamp.append([str(p), st.st_size, st.st_mtime_ns])
        elif p.is_dir():
            entries = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames):
                    st = os.stat(os.path.join(dirpath, f))
                    entries.append(
                        [os.path.relpath(os.path.join(dirpath, f), p), st.st_size, st.st_mtime_ns]
                    )
            stamp.append([str(p), hash_obj(entries)])
        else:
            stamp.append([str(p), None])
    return stamp


def cache_path(name: str, key: dict, cache: str | os.PathLike | None = None) -> Path:
    """<cache root>/datasets/<name>-<hash>.parquet."""
    safe = slug(name).strip("_")[:60] or "dataset"
    return (
        cache_root(cache)
        / "datasets"
        / f"{safe}-{hash_obj({'index': INDEX_VERSION, **key})}.parquet"
    )


def load_cached(path: Path) -> DatasetIndex | None:
    """The cached index, or None when absent or unreadable (then it is listed again)."""
    if not path.is_file():
        return None
    try:
        return DatasetIndex.load(path)
    except Exception:  # noqa: BLE001 - a corrupt cache file only costs a re-listing
        return None
