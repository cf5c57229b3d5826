"""COCO and Flickr30k captions in the Karpathy-split JSON (``dataset_coco.json`` & co).

``dataset_coco.json``, ``dataset_flickr30k.json`` (and ``dataset_flickr8k.json``): ``{"dataset": "coco", "images": [{"filepath": "val2014" (COCO only),
"filename": "COCO_val2014_000000391895.jpg", "split": "train"|"val"|"test"|"restval",
"sentences": [{"raw": "A man ...", "tokens": [...]}, ...], ...}, ...]}``. Image references
resolve under the ``images`` folder (default: the JSON's folder) joined with filepath/filename.

The Karpathy split is kept (restval goes to train), as every retrieval paper reports on it: the
5k COCO test images and the 1k Flickr30k test images. Item ids are stable:
"val2014/COCO_val2014_000000391895" (filepath/stem) or "1000092795" (Flickr, stem only).

>>> idx = list_karpathy("coco/dataset_coco.json", images="coco/")  # doctest: +SKIP
>>> idx.summary()["splits"]  # doctest: +SKIP
{'test': 5000, 'train': 113287, 'val': 5000}
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from ..errors import DataError
from .index import DatasetIndex

LISTING_VERSION = 1
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
_FORMAT = "a Karpathy-split JSON ({'images': [{'filename', 'split', 'sentences': [{'raw'}]}]})"


def _load(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"Karpathy-split JSON not found: {path} (dataset_coco.json or dataset_flickr30k.json "
            "from Karpathy's caption splits)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not {_FORMAT}: the top-level key 'images' is missing")
    return data


def _check(entry, n: int, path: Path) -> None:
    """Fail on the first key image `n` lacks, naming it."""
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not {_FORMAT}: images[{n}] is not an object")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise DataError(f"{path} is not {_FORMAT}: images[{n}] has no key '{key}'")
    if not isinstance(entry["sentences"], list):
        raise DataError(f"{path}: images[{n}]['sentences'] is not a list")
    for k, s in enumerate(entry["sentences"]):
        if not isinstance(s, dict) or "raw" not in s:
            raise DataError(
                f"{path} is not {_FORMAT}: images[{n}]['sentences'][{k}] has no key 'raw'"
            )
    if entry["split"] not in SPLITS:
        raise DataError(
            f"{path}: images[{n}] has split '{entry['split']}': expected one of {', '.join(SPLITS)}"
        )


def list_karpathy(path: str | os.PathLike, images: str | os.PathLike | None = None) -> DatasetIndex:
    """One item per image with all its raw captions; split from the JSON (restval -> train).

    Captions are stripped and empty ones dropped; an image left with none is dropped and counted
    in ``meta["dropped_without_caption"]``. Only the image folders are checked (``images`` and
    each filepath under it), not every file: a missing file is reported at extraction.
    """
    json_path = Path(path).expanduser()
    data = _load(json_path)
    root = (Path(images).expanduser() if images is not None else json_path.parent).absolute()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (pass images=<the folder of the images>)")
    records, folders, dropped, original = _records(data["images"], json_path)
    if not records:
        raise DataError(f"{json_path} has no image with a caption ({dropped} without one)")
    _check_folders(root, folders)
    dataset = str(data.get("dataset") or json_path.stem)
    meta = {
        "source": str(json_path),
        "images": str(root),
        "dataset": dataset,
        "karpathy_splits": original,
        "dropped_without_caption": dropped,
        "captions": sum(len(r["caption"]) for r in records),
    }
    return DatasetIndex.from_records(
        f"{dataset}-karpathy",
        records,
        {"image": "image", "caption": "text"},
        root=str(root),
        meta=meta,
    )


def _records(entries: list, json_path: Path) -> tuple[list[dict], set[str], int, dict[str, int]]:
    """One record per image with a caption; the folders they are in; the count of images
    without a caption; images per original split."""
    records, folders, dropped, original = [], set(), 0, {}
    for n, entry in enumerate(entries):
        _check(entry, n, json_path)
        original[entry["split"]] = original.get(entry["split"], 0) + 1
        captions = [s["raw"].strip() for s in entry["sentences"]
                    if isinstance(s["raw"], str) and s["raw"].strip()]
        if not captions:
            dropped += 1
            continue
        filepath = str(entry.get("filepath") or "").strip("/")
        folders.add(filepath)
        stem = PurePosixPath(entry["filename"]).stem
        records.append({
            "item_id": f"{filepath}/{stem}" if filepath else stem,
            "image": PurePosixPath(filepath, entry["filename"]).as_posix(),
            "caption": captions,
            "split": SPLITS[entry["split"]],
        })
    return records, folders, dropped, original


def _check_folders(root: Path, folders: set[str]) -> None:
    missing = sorted(f for f in folders if f and not (root / f).is_dir())
    if missing:
        raise DataError(
            f"image folders not found under {root}: {', '.join(missing)} (the JSON refers to "
            "images in them; pass images=<the folder that holds them>)"
        )
