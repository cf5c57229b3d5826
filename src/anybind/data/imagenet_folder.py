"""ImageNet-style labelled evaluation folders: ``root/<wnid or class dir>/*.JPEG``.

The readable class names come from one of:

- a JSON file: a list of names in the sorted order of the class folders, a ``{dir: name}``
  mapping, or the ``{"0": [wnid, name], ...}`` layout of ``imagenet_class_index.json``;
- a ``LOC_synset_mapping.txt``-style text file, one ``n01440764 tench, Tinca tinca`` line per
  class (the first comma-separated name is taken);
- the folder names themselves ("golden_retriever" -> "golden retriever") when none is given.

Every item is in the "test" split (an evaluation set); its group is its own id.

>>> idx = list_imagenet_folder("imagenet/val", class_names="LOC_synset_mapping.txt")  # doctest: +SKIP
>>> idx.column("label")[:2]  # doctest: +SKIP
['tench', 'tench']
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from .folders import class_caption
from .index import DatasetIndex

LISTING_VERSION = 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _from_json(path: Path, dirs: list[str]) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"class-name file {path} is not readable JSON: {exc}") from exc
    if isinstance(data, list):
        if len(data) != len(dirs):
            raise DataError(
                f"{path} lists {len(data)} class names but there are {len(dirs)} class folders: "
                "a JSON list must name every folder, in sorted folder order "
                "(or give a {folder: name} mapping)"
            )
        return {d: data[i] for i, d in enumerate(dirs)}
    if isinstance(data, dict):
        values = list(data.values())
        if values and all(isinstance(v, list) and len(v) == 2 for v in values):
            return {str(v[0]): v[1] for v in values}  # imagenet_class_index.json
        return {str(k): v for k, v in data.items()}
    raise DataError(
        f"{path} holds a JSON {type(data).__name__}: give a list of class names (in sorted folder "
        "order) or a {folder: name} mapping"
    )


def _from_text(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"class-name file {path} is not readable text: {exc}") from exc
    names: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        folder, *rest = line.split(None, 1)
        name = rest[0].split(",")[0].strip() if rest else ""
        if not name:
            raise DataError(
                f"{path} line {number} ('{line.strip()}') has no class name: each line must be "
                "'<folder> <name>[, <other names>]', as in LOC_synset_mapping.txt"
            )
        names[folder] = name
    return names


def read_class_names(path: str | os.PathLike, dirs: list[str]) -> list[str]:
    """The readable name of each class folder in `dirs`, from a JSON or a synset-mapping file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class-name file not found: {path}")
    mapping = _from_json(path, dirs) if path.suffix.lower() == ".json" else _from_text(path)
    missing = [d for d in dirs if d not in mapping]
    if missing:
        example = next(iter(mapping), None)
        raise DataError(
            f"{path} names no class for the folders {_few(missing)} "
            f"(it names {len(mapping)} classes, e.g. '{example}'): the file must name every "
            "class folder by its folder name"
        )
    names = [mapping[d] for d in dirs]
    bad = [d for d, n in zip(dirs, names, strict=True) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise DataError(f"{path} gives an empty or non-text class name for {_few(bad)}")
    return [n.strip() for n in names]


def list_imagenet_folder(
    path: str | os.PathLike, class_names: str | os.PathLike | None = None
) -> DatasetIndex:
    """One item per image of ``path/<class dir>/``; label = the readable class name, split "test".

    ``meta["classes"]`` holds the class names in sorted class-folder order (the order of
    ``meta["class_dirs"]``); names shared by several folders (ImageNet has two "crane"s) are
    listed in ``meta["duplicate_class_names"]``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"ImageNet-style folder not found: {root} (expected <root>/<wnid or class>/*.JPEG)"
        )
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images = {d: _images(root / d) for d in dirs}
    if not any(images.values()):
        loose = [p.name for p in _images(root)][:3]
        hint = (
            f"; images lie directly in it ({', '.join(loose)}): put them in class folders"
            if loose
            else ""
        )
        raise DataError(
            f"{root} has no images in class folders (expected <root>/<class>/*.JPEG, *.jpg or "
            f"*.png){hint}"
        )
    if class_names is not None:
        names = read_class_names(class_names, dirs)
    else:
        names = [class_caption(d) for d in dirs]
    label_of = dict(zip(dirs, names, strict=True))
    records = []
    for d in dirs:
        for p in images[d]:
            rel = p.relative_to(root).as_posix()
            records.append({"item_id": rel, "image": rel, "label": label_of[d], "split": "test"})
    shared: dict[str, list[str]] = {}
    for d, n in label_of.items():
        shared.setdefault(n, []).append(d)
    meta = {
        "source": str(root),
        "class_names": str(Path(class_names).expanduser()) if class_names is not None else None,
        "classes": names,
        "class_dirs": dirs,
        "duplicate_class_names": {n: ds for n, ds in shared.items() if len(ds) > 1},
        "empty_class_dirs": [d for d in dirs if not images[d]],
    }
    return DatasetIndex.from_records(
        root.name or "imagenet", records, {"image": "image"}, root=str(root), meta=meta
    )
