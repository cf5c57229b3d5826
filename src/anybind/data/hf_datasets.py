"""Hugging Face `datasets` folders, listed with pyarrow alone (the `datasets` package is not needed).

``hf:FOLDER`` is what ``Dataset.save_to_disk`` writes (``state.json`` + ``data-*.arrow``) or
``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such folder per split; validation and
test are kept, train too when there is a validation split; the rest is split by hash as usual).
A folder of the Hub's Parquet files (``data/train-*.parquet``) is listed by `parquet_images`.

The Arrow files are memory-mapped: listing reads the caption, label and id columns only, and
each image becomes ``arrow://<file>#<column>/<row>``, which the extraction workers read through
the same mapping (`read_cell`: one row, no copy of the rest). The image column is the one the
features call an ``Image`` (bytes, or a path when the images were never embedded); the other
roles are found as in `tables`. item_id = the id column, else ``<split>/<row>`` (``<row>`` for
one dataset).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import DataError
from .index import DatasetIndex
from .parquet_images import (
    cell_media,
    class_names,
    column_roles,
    kept_splits,
    list_parquet,
    merge_records,
    parse_ref,
    resolve_parquet_files,
    table_records,
    wanted_columns,
)

LISTING_VERSION = 1


def is_hf_folder(path: Path) -> bool:
    """A folder `save_to_disk` wrote (one dataset, or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _splits(root: Path) -> list[tuple[str | None, Path]]:
    """(split name or None, dataset folder) for each dataset of a save_to_disk folder."""
    if (root / "dataset_dict.json").is_file():
        names = _read_json(root / "dataset_dict.json").get("splits") or []
        return [(str(n), root / str(n)) for n in names]
    return [(_read_json(root / "state.json").get("_split"), root)]


@functools.lru_cache(maxsize=16)
def _mapped(path: str, mtime_ns: int, size: int) -> pa.Table:
    """An Arrow stream file as a table backed by a memory map (no copy: reading a row touches its pages)."""
    try:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read Arrow file {path}: {exc}") from None


def mapped_table(path: str | os.PathLike) -> pa.Table:
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"Arrow file not found: {path}") from None
    return _mapped(path, st.st_mtime_ns, st.st_size)


def _dataset_records(folder: Path, split: str | None, prefix: str, options: dict) -> Iterator[dict]:
    """The records of one saved dataset, file by file, without touching its images."""
    state = _read_json(folder / "state.json")
    features = (_read_json(folder / "dataset_info.json") if (folder / "dataset_info.json").is_file()
                else {}).get("features") or {}
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{folder}: state.json lists no data files")
    offset = 0
    for path in files:
        table = mapped_table(path)
        roles = column_roles(table.schema, features, str(folder), **options)
        ref = f"arrow://{path.resolve()}#{roles['image']}"
        batches = table.select(wanted_columns(roles)).to_batches()
        yield from table_records(batches, roles, lambda row, ref=ref: f"{ref}/{row}",
                                 lambda row, offset=offset: f"{prefix}{offset + row}",
                                 split, class_names(features, roles["label"]))
        offset += table.num_rows


def list_hf(path: str | os.PathLike, *, image: str | None = None, caption: str | list[str] | None = None,
            label: str | None = None, id: str | None = None, group: str | None = None,
            name: str | None = None) -> DatasetIndex:
    """List a Hugging Face datasets folder (save_to_disk), or a folder of its Hub Parquet files.

    >>> ds.save_to_disk("coco-hf")  # a DatasetDict with an Image column and a caption column  # doctest: +SKIP
    >>> idx = list_hf("coco-hf")  # doctest: +SKIP
    """
    root = Path(path).expanduser()
    options = {"image": image, "caption": caption, "label": label, "id": id, "group": group}
    if not root.is_dir():
        raise DataError(f"hf:{path}: not a folder (a Hugging Face dataset saved with save_to_disk)")
    if not is_hf_folder(root):
        try:
            resolve_parquet_files(root)
        except DataError:
            raise DataError(f"hf:{path}: neither a save_to_disk folder (state.json or dataset_dict.json) "
                            "nor a folder of Parquet files") from None
        return list_parquet(root, name=name or root.name, **options)
    splits = _splits(root)
    several = len(splits) > 1 or (root / "dataset_dict.json").is_file()
    kept = kept_splits(s for s, _ in splits)
    records = merge_records(r for split, folder in splits
                            for r in _dataset_records(folder, kept[split], f"{split}/" if several else "", options))
    meta = {"source": str(root), "splits": [s for s, _ in splits]}
    return DatasetIndex.from_records(name or root.resolve().name, records, {"image": "image", "caption": "text"},
                                     meta=meta)


def read_cell(rest: str) -> bytes | str:
    """The encoded image ``arrow://<rest>`` names (bytes), or the file its cell names."""
    path, column, row = parse_ref("arrow", rest)
    table = mapped_table(path)
    if column not in table.column_names:
        raise DataError(f"{path} has no column '{column}': it has {', '.join(table.column_names)}")
    if row >= table.num_rows:
        raise DataError(f"{path} has {table.num_rows} rows; row {row} does not exist")
    return cell_media(table.column(column)[row].as_py(), f"arrow://{rest}", os.path.dirname(path))
