"""Labelled folders: ``root/<class>/.../*.jpg`` (or ``*.wav``) -> label = class, caption = class words.

Images give an ``image`` field, audio files (`audio.AUDIO_EXTENSIONS`) an ``audio`` field. A
folder holding both pairs them by path without extension (``dog/001.jpg`` + ``dog/001.wav`` is
one item, id ``dog/001``); a folder of one kind keeps the file's path as the item id.

An ImageNet-style layout with split folders on top (``root/train/<class>/...``,
``root/val/<class>/...``) is recognised too: the class is then the second level, and the folder
split stays visible in the item id only (splits are always the group hash).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .index import DatasetIndex

LISTING_VERSION = 2  # 2: audio files
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


def media_of(path: Path) -> str | None:
    """'image', 'audio' or None (not a file a folder dataset lists)."""
    from .audio import is_audio

    if path.name.startswith("."):
        return None
    if is_image(path):
        return "image"
    return "audio" if is_audio(path) else None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def looks_like_folder_dataset(root: str | os.PathLike) -> bool:
    """A directory whose subfolders hold images or audio (used by `load_dataset` to auto-detect)."""
    root = Path(root)
    if not root.is_dir():
        return False
    return any(any(media_of(p) for p in d.rglob("*")) for d in _class_dirs(root)[:20])


def list_folder(root: str | os.PathLike, name: str | None = None) -> DatasetIndex:
    """One item per image or audio file (or per image+audio pair); label and caption from its
    class folder.

    >>> idx = list_folder("pets/")  # pets/cat/1.jpg, pets/dog/2.jpg  # doctest: +SKIP
    >>> idx.column("label")  # doctest: +SKIP
    ['cat', 'dog']
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    tops = _class_dirs(root)
    split_layout = bool(tops) and all(d.name.lower() in SPLIT_FOLDERS for d in tops)
    class_roots = [c for d in tops for c in _class_dirs(d)] if split_layout else tops
    files = [(class_dir.name, path, media_of(path)) for class_dir in class_roots
             for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and media_of(p))]
    if not files:
        loose = [p.name for p in root.iterdir() if p.is_file() and media_of(p)][:3]
        hint = (
            f" (files lie directly in it, e.g. {', '.join(loose)}: put them in class subfolders)"
            if loose
            else ""
        )
        raise DataError(f"{root} has no class subfolders with images or audio files{hint}")
    media = [m for m in ("image", "audio") if any(kind == m for _, _, kind in files)]
    records = _records(root, files, paired=len(media) > 1)
    meta = {
        "source": str(root),
        "split_folders": split_layout,
        "classes": sorted({r["label"] for r in records}),
    }
    return DatasetIndex.from_records(
        name or root.name, records, {**{m: m for m in media}, "caption": "text"}, root=str(root), meta=meta
    )


def _records(root: Path, files: list[tuple[str, Path, str]], paired: bool) -> list[dict]:
    """One record per file; with `paired`, files with the same path but their extension are one."""
    records: dict[str, dict] = {}
    for label, path, kind in files:
        rel = path.relative_to(root).as_posix()
        key = rel.rsplit(".", 1)[0] if paired else rel
        record = records.setdefault(key, {"item_id": key, "caption": class_caption(label), "label": label})
        record.setdefault(kind, rel)  # a second file of one kind (a.wav, a.flac) keeps the first
    return list(records.values())
