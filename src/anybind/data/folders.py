"""Labelled image folders: ``root/<class>/.../*.jpg`` -> label = class, caption = class words.

An ImageNet-style layout with split folders on top (``root/train/<class>/...``,
``root/val/<class>/...``) is recognised too: the class is then the second level, and the folder
split stays visible in the item id only (splits are always the group hash).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .index import DatasetIndex

LISTING_VERSION = 1
IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
}
SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}


def class_caption(name: str) -> str:
    """'golden_retriever' -> 'golden retriever'."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def looks_like_folder_dataset(root: str | os.PathLike) -> bool:
    """A directory whose subfolders hold images (used by `load_dataset` to auto-detect)."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any(any(is_image(p) for p in d.rglob("*")) for d in _class_dirs(root)[:20])


def list_folder(root: str | os.PathLike, name: str | None = None) -> DatasetIndex:
    """One item per image file; label and caption from its class folder.

    >>> idx = list_folder("pets/")  # pets/cat/1.jpg, pets/dog/2.jpg  # doctest: +SKIP
    >>> idx.column("label")  # doctest: +SKIP
    ['cat', 'dog']
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    tops = _class_dirs(root)
    split_layout = bool(tops) and all(d.name.lower() in SPLIT_FOLDERS for d in tops)
    class_roots = [c for d in tops for c in _class_dirs(d)] if split_layout else tops
    records = []
    for class_dir in class_roots:
        label = class_dir.name
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image(p)):
            rel = path.relative_to(root).as_posix()
            records.append(
                {"item_id": rel, "image": rel, "caption": class_caption(label), "label": label}
            )
    if not records:
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image(p)][:3]
        hint = (
            f" (images lie directly in it, e.g. {', '.join(loose)}: put them in class subfolders)"
            if loose
            else ""
        )
        raise DataError(f"{root} has no class subfolders with images{hint}")
    meta = {
        "source": str(root),
        "split_folders": split_layout,
        "classes": sorted({r["label"] for r in records}),
    }
    return DatasetIndex.from_records(
        name or root.name, records, {"image": "image", "caption": "text"}, root=str(root), meta=meta
    )
