"""Parquet files whose image column holds the encoded image (img2dataset, Hugging Face), listed
without reading a single image.

``parquet:PATH`` (a file, a folder of ``*.parquet``, or a glob). The image column is the one
Hugging Face's metadata calls an ``Image``, else the one column of encoded bytes (``binary``, or
HF's ``struct<bytes, path>``), preferring the names img2dataset and HF use (``jpg``, ``image``, ...);
``image=`` names it. Captions, labels, ids and groups are found as in `tables` (img2dataset's
``key`` is the id, ``txt`` the caption, and its rows whose ``status`` is not ``success`` are failed
downloads, left out); an HF ``ClassLabel`` label becomes its class name.

Listing reads the other columns only, batch by batch (`LIST_BATCH_ROWS`), so its memory does not
grow with the images. Each image becomes ``parquet://<file>#<column>/<row>``; the extraction
workers read it (`read_cell`): the row group holding the row, that column only, kept for the
next rows (`CACHED_ROW_GROUPS` per process), so a worker reading its batch in order reads each
row group once. item_id = the id column, else ``<file stem>/<row>``. Files named like the Hub's
``validation-00000-of-00004.parquet`` keep that split (`kept_splits`).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import DataError
from .index import DatasetIndex
from .tables import _captions_of, _scalar, detect_columns

LISTING_VERSION = 1
#: names of an encoded-image column, in order of preference (img2dataset writes jpg/png/webp)
IMAGE_BYTES_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
#: rows read at a time while listing (the image column is never among them)
LIST_BATCH_ROWS = 8192
#: row groups (one column each) a process keeps for the next rows: bounded memory per worker
CACHED_ROW_GROUPS = 2
#: the Hugging Face split names -> anybind's
HF_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


# ---- which column is what ------------------------------------------------------------------------
def hf_features(schema: pa.Schema) -> dict:
    """The Hugging Face features a file's schema metadata records ({} when none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}


def is_image_bytes(kind: pa.DataType) -> bool:
    """Encoded bytes, or HF's {bytes, path} struct."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and is_image_bytes(kind.field("bytes").type)


def holds_images(schema: pa.Schema) -> bool:
    """Whether a bare path is a Parquet of images (not a table of paths): an HF Image column, or an
    encoded-bytes column with an image's name."""
    if any(isinstance(f, dict) and f.get("_type") == "Image" for f in hf_features(schema).values()):
        return True
    return any(is_image_bytes(f.type) and f.name.lower() in IMAGE_BYTES_NAMES for f in schema)


def image_column(schema: pa.Schema, asked: str | None, features: dict, source: str) -> str:
    """The column holding the encoded images: `asked`, HF's Image feature, else the bytes column."""
    if asked is not None:
        if asked not in schema.names:
            raise DataError(f"{source} has no column '{asked}': it has {', '.join(schema.names)}")
        return asked
    typed = [c for c, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image" and c in schema.names]
    kinds = {c: f.get("_type") if isinstance(f, dict) else None for c, f in features.items()}
    # bytes the features call Audio or Video are no image; plain binary (Value) or no features may be
    found = typed or [f.name for f in schema if is_image_bytes(f.type) and kinds.get(f.name) in (None, "Value")]
    if len(found) > 1:
        named = [n for n in IMAGE_BYTES_NAMES if n in found]
        found = named[:1] or found
        if len(found) > 1:
            raise DataError(f"{source} has several image-bytes columns ({', '.join(found)}): name one with image=")
    if not found:
        raise DataError(f"{source} has no column of encoded images (binary bytes, or a Hugging Face Image): "
                        f"it has {', '.join(schema.names)}; img2dataset writes the images in a parquet only with "
                        "output_format=parquet (beside .tar shards its parquet holds metadata: use wds:)")
    return found[0]


def column_roles(schema: pa.Schema, features: dict, source: str, image=None, caption=None, label=None,
                 id=None, group=None) -> dict:
    """{'image', 'caption': [...], 'label', 'id', 'group', 'status'}: the image column by type, the
    others by name (img2dataset's caption is ``txt``; its ``status`` marks failed downloads)."""
    image = image_column(schema, image, features, source)
    plain = [f.name for f in schema if f.name == image or not (is_image_bytes(f.type) or pa.types.is_struct(f.type))]
    try:
        roles = detect_columns(plain, image=image, caption=caption, label=label, id=id, group=group)
    except DataError as exc:
        if caption is not None or "txt" not in plain:
            raise DataError(f"{source}: {exc}") from None
        roles = detect_columns(plain, image=image, caption="txt", label=label, id=id, group=group)
    roles.pop("audio", None)
    roles["status"] = "status" if {"status", "error_message"} <= set(plain) else None  # img2dataset's
    return roles


def class_names(features: dict, column: str | None) -> list[str] | None:
    """The names of an HF ClassLabel column (its cells are their positions)."""
    feature = features.get(column) if column else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        return list(feature.get("names") or []) or None
    return None


def split_from_name(path: Path) -> str | None:
    """The split a Hub file name says (``train-00000-of-00004``, ``validation.parquet``), else None."""
    match = re.match(r"^([A-Za-z]+)(?:[-_.]|$)", path.stem)
    return match.group(1).lower() if match and match.group(1).lower() in HF_SPLITS else None


def kept_splits(names: Iterable[str | None]) -> dict:
    """HF split name -> anybind split: validation and test are kept; train too when a validation
    split exists, else its items are split by hash (so training still has a val split)."""
    mapped = {n: HF_SPLITS.get((n or "").lower()) for n in names}
    if "val" not in mapped.values():
        mapped = {n: None if s == "train" else s for n, s in mapped.items()}
    return mapped


# ---- listing -------------------------------------------------------------------------------------
def resolve_parquet_files(spec: str | os.PathLike) -> list[Path]:
    """The Parquet files of a file, a folder (every ``*.parquet`` under it) or a glob, sorted."""
    text = os.path.expanduser(os.fspath(spec))
    path = Path(text)
    if path.is_dir():
        files = [p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_"))]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(text)] if glob.has_magic(text) else []
    if not files:
        raise DataError(f"no Parquet files found for '{spec}'")
    return sorted({p.resolve() for p in files})


def _label_of(value, names: list[str] | None) -> str | None:
    if names is not None and isinstance(value, int):
        return names[value] if 0 <= value < len(names) else None  # HF marks "no label" with -1
    return _scalar(value)


def table_records(batches: Iterable, roles: dict, ref_of: Callable[[int], str], default_id: Callable[[int], str],
                  split: str | None = None, names: list[str] | None = None) -> Iterator[dict]:
    """One record per row of `batches` (record batches without the image column): the image as
    `ref_of(row)`, captions, label (a ClassLabel's name), group, id (`default_id(row)` when none).
    A row whose download failed (img2dataset's status) is left out: it holds no image."""
    row = -1
    for batch in batches:
        cols = {role: batch.column(c).to_pylist() for role, c in roles.items()
                if role in ("id", "label", "group", "status") and c}
        captions = [batch.column(c).to_pylist() for c in roles["caption"]]
        for i in range(batch.num_rows):
            row += 1
            if "status" in cols and cols["status"][i] != "success":
                continue
            item_id = _scalar(cols["id"][i]) if "id" in cols else None
            yield {"item_id": item_id or default_id(row), "image": ref_of(row),
                   "caption": list(dict.fromkeys(c for col in captions for c in _captions_of(col[i]))),
                   "label": _label_of(cols["label"][i], names) if "label" in cols else None,
                   "group": _scalar(cols["group"][i]) if "group" in cols else None, "split": split}


def merge_records(records: Iterable[dict]) -> list[dict]:
    """Rows with the same item id are one item (their captions joined; the first image kept)."""
    items: dict[str, dict] = {}
    for record in records:
        item = items.setdefault(record["item_id"], record)
        if item is not record:
            item["caption"] += [c for c in record["caption"] if c not in item["caption"]]
    return list(items.values())


def wanted_columns(roles: dict) -> list[str]:
    """Every column the listing reads: all roles but the image."""
    named = [roles[r] for r in ("id", "label", "group", "status") if roles.get(r)]
    return list(dict.fromkeys([*roles["caption"], *named]))


def _file_records(path: Path, options: dict, split: str | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read Parquet file {path}: {exc}") from None
    features = hf_features(parquet.schema_arrow)
    roles = column_roles(parquet.schema_arrow, features, str(path), **options)
    batches = parquet.iter_batches(batch_size=LIST_BATCH_ROWS, columns=wanted_columns(roles))
    yield from table_records(batches, roles, lambda row: f"parquet://{path}#{roles['image']}/{row}",
                             lambda row: f"{path.stem}/{row}", split,
                             class_names(features, roles["label"]))


def list_parquet(path: str | os.PathLike, *, image: str | None = None, caption: str | list[str] | None = None,
                 label: str | None = None, id: str | None = None, group: str | None = None,
                 name: str | None = None) -> DatasetIndex:
    """List Parquet files holding encoded images: one item per row (rows with one id merge).

    >>> idx = list_parquet("laion-parquet/")  # img2dataset output_format=parquet  # doctest: +SKIP
    >>> idx = list_parquet("coco/data/*.parquet", caption="sentences")  # a Hub dataset  # doctest: +SKIP
    """
    files = resolve_parquet_files(path)
    options = {"image": image, "caption": caption, "label": label, "id": id, "group": group}
    splits = kept_splits(split_from_name(f) for f in files)
    records = merge_records(r for f in files for r in _file_records(f, options, splits[split_from_name(f)]))
    default = Path(os.fspath(path).split("*")[0].rstrip("/")).stem or "parquet"
    meta = {"source": os.fspath(path), "files": [str(f) for f in files]}
    return DatasetIndex.from_records(name or default, records, {"image": "image", "caption": "text"}, meta=meta)


# ---- reading one image (in the extraction workers) -----------------------------------------------
def parse_ref(scheme: str, rest: str) -> tuple[str, str, int]:
    """``<file>#<column>/<row>`` -> (file, column, row)."""
    path, _, cell = rest.rpartition("#")
    column, _, row = cell.rpartition("/")
    if not path or not column or not row.isdigit():
        raise DataError(f"bad {scheme} reference '{scheme}://{rest}': expected {scheme}://<file>#<column>/<row>")
    return path, column, int(row)


def cell_media(value, where: str, folder: str) -> bytes | str:
    """A cell's encoded image (bytes), or the file an HF Image cell names instead (relative to `folder`)."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data:
        return bytes(data)
    if path:
        return path if os.path.isabs(path) else os.path.join(folder, path)
    raise DataError(f"{where}: the row holds no image (neither bytes nor a path)")


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    return tuple(starts)


_GROUPS: OrderedDict = OrderedDict()  # (path, stamp, column, group) -> that column of that row group


def _row_group_column(path: str, stamp: tuple, column: str, group: int) -> pa.Array:
    import pyarrow.parquet as pq

    key = (path, stamp, column, group)
    if key in _GROUPS:
        _GROUPS.move_to_end(key)
        return _GROUPS[key]
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no column '{column}': it has {', '.join(parquet.schema_arrow.names)}")
    array = parquet.read_row_group(group, columns=[column]).column(0).combine_chunks()
    _GROUPS[key] = array
    while len(_GROUPS) > CACHED_ROW_GROUPS:
        _GROUPS.popitem(last=False)
    return array


def read_cell(rest: str) -> bytes | str:
    """The encoded image ``parquet://<rest>`` names (bytes), or the file its cell names."""
    import bisect

    path, column, row = parse_ref("parquet", rest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"Parquet file not found: {path}") from None
    stamp = (st.st_mtime_ns, st.st_size)
    starts = _row_group_starts(path, *stamp)
    if row >= starts[-1]:
        raise DataError(f"{path} has {starts[-1]} rows; row {row} does not exist")
    group = bisect.bisect_right(starts, row) - 1
    value = _row_group_column(path, stamp, column, group)[row - starts[group]].as_py()
    return cell_media(value, f"parquet://{rest}", os.path.dirname(path))
