"""Built-in dataset: Fashion-MNIST (Debian `dataset-fashion-mnist`, MIT), or any IDX folder.

70,000 28x28 grey images of 10 clothing classes. Images are referenced as
``idx://<images file>#<row>`` (decoded once per process, see `idx.cached_idx`). The caption is
the class name, the label too.

Splits come from the group hash, like every other dataset: the official train/test partition is
kept only in the item id ("train-123", "test-45"), so results can still be related to it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DataError
from .idx import cached_idx
from .index import DatasetIndex

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
LISTING_VERSION = 1
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
OFFICIAL_SPLITS = {"train": "train", "t10k": "test", "test": "test"}


def find_idx_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """{official split: (images file, labels file)} for files named like ``train-images-idx3-ubyte.gz``."""
    pairs: dict[str, dict[str, Path]] = {}
    for p in sorted(root.iterdir()):
        m = re.match(r"^(train|t10k|test)[-_.](images|labels)[-_.]idx[13]", p.name)
        if m and p.is_file():
            pairs.setdefault(OFFICIAL_SPLITS[m.group(1)], {})[m.group(2)] = p
    return {
        s: (f["images"], f["labels"]) for s, f in pairs.items() if {"images", "labels"} <= set(f)
    }


def list_fashion_mnist(
    root: str | os.PathLike | None = None, classes: list[str] | None = None
) -> DatasetIndex:
    """List an IDX image folder (Fashion-MNIST by default; give `classes` for MNIST and the like).

    >>> idx = list_fashion_mnist()  # doctest: +SKIP
    >>> idx.summary()["items"]  # doctest: +SKIP
    70000
    """
    root = Path(root or DEFAULT_ROOT)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found at {root}: apt-get install dataset-fashion-mnist")
    pairs = find_idx_pairs(root)
    if not pairs:
        raise DataError(f"no IDX image/label pairs (train-images-idx3-ubyte[.gz] ...) in {root}")
    names = list(classes or FASHION_CLASSES)
    records, counts = [], {}
    for split, (images_path, labels_path) in sorted(pairs.items(), key=lambda kv: kv[0] != "train"):
        images, labels = cached_idx(images_path), cached_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} do not pair up"
            )
        if int(labels.max(initial=0)) >= len(names):
            raise DataError(
                f"{labels_path} has label {int(labels.max())} but only {len(names)} class names"
            )
        ref = f"idx://{images_path.resolve()}#"
        for i, y in enumerate(labels.tolist()):
            records.append(
                {
                    "item_id": f"{split}-{i}",
                    "image": f"{ref}{i}",
                    "caption": names[y],
                    "label": names[y],
                }
            )
        counts[split] = len(labels)
    meta = {
        "source": str(root),
        "licence": "MIT (Zalando Research)",
        "official_splits": counts,
        "classes": names,
    }
    return DatasetIndex.from_records(
        "fashion-mnist", records, {"image": "image", "caption": "text"}, meta=meta
    )
