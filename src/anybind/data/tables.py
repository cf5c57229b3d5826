"""Paired tables (CSV, TSV, JSONL, Parquet): an image column plus one or more caption columns.

Column roles are found by common names and can be given explicitly (``image=``, ``caption=``,
``label=``, ``id=``, ``group=``). Several captions per image come from several caption columns,
a caption cell holding a list (JSON/Parquet lists, or a JSON list in a CSV cell), or several
rows naming the same image: they merge into one item. Relative image paths resolve against
the table's folder (``root``). item_id = the id column when there is one, else the image path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

from ..errors import DataError
from .index import DatasetIndex

LISTING_VERSION = 1
IMAGE_NAMES = (
    "image",
    "image_path",
    "imagepath",
    "img",
    "img_path",
    "filepath",
    "file_path",
    "file",
    "filename",
    "file_name",
    "path",
    "url",
    "image_url",
    "img_url",
)
CAPTION_NAMES = (
    "caption",
    "captions",
    "text",
    "texts",
    "sentence",
    "sentences",
    "raw",
    "alt",
    "alt_text",
)
FALLBACK_CAPTION_NAMES = ("title", "description")
LABEL_NAMES = ("label", "labels", "class", "class_name", "category")
ID_NAMES = ("id", "item_id", "key", "image_id", "uid", "sample_id")
GROUP_NAMES = ("group", "group_id")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")


# ---- reading ----------------------------------------------------------------------------------
def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a CSV/TSV/JSONL/JSON/Parquet file into an Arrow table (format from the suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".tab"):
            from pyarrow import csv

            parse = csv.ParseOptions(
                delimiter="\t" if suffix != ".csv" else ",", newlines_in_values=True
            )
            convert = csv.ConvertOptions(strings_can_be_null=True)
            return csv.read_csv(path, parse_options=parse, convert_options=convert)
        if suffix in (".jsonl", ".ndjson"):
            from pyarrow import json as pajson

            return pajson.read_json(path)
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # {"images": [...]} / {"data": [...]}
                rows = next((v for v in rows.values() if isinstance(v, list)), None)
            if not isinstance(rows, list):
                raise DataError(f"{path}: a JSON table must be a list of objects")
            return pa.Table.from_pylist(rows)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
    except FileNotFoundError as exc:
        raise DataError(f"table not found: {path}") from exc
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise DataError(f"cannot read table {path}: {exc}") from exc
    raise DataError(f"unknown table format '{suffix}' for {path}: use {', '.join(TABLE_SUFFIXES)}")


# ---- column roles -----------------------------------------------------------------------------
def _find(columns: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _numbered(columns: list[str], names: tuple[str, ...]) -> list[str]:
    """caption_1, caption2, sentence_3 ... (several caption columns)."""
    pat = re.compile(rf"^({'|'.join(names)})[\s_\-]?\d+$", re.IGNORECASE)
    return [c for c in columns if pat.match(c.strip())]


def detect_columns(
    columns: list[str], image=None, caption=None, label=None, id=None, group=None
) -> dict:
    """{'image': col, 'caption': [cols], 'label': col|None, 'id': col|None, 'group': col|None}.

    Explicit arguments win; `caption` may be one name or a list. Unknown names are a DataError
    that lists the table's columns.
    """

    def check(col):
        if col is not None and col not in columns:
            raise DataError(f"the table has no column '{col}': it has {', '.join(columns)}")
        return col

    roles = {
        "image": check(image) or _find(columns, IMAGE_NAMES),
        "label": check(label) or _find(columns, LABEL_NAMES),
        "id": check(id) or _find(columns, ID_NAMES),
        "group": check(group) or _find(columns, GROUP_NAMES),
    }
    if caption is not None:
        caps = [caption] if isinstance(caption, str) else list(caption)
        for c in caps:
            check(c)
    else:
        caps = [c for c in columns if c.lower().strip() in CAPTION_NAMES] + _numbered(
            columns, CAPTION_NAMES
        )
        if not caps:
            caps = [c for c in columns if c.lower().strip() in FALLBACK_CAPTION_NAMES]
    roles["caption"] = list(
        dict.fromkeys(c for c in caps if c not in (roles["image"], roles["id"]))
    )
    if roles["image"] is None:
        raise DataError(f"no image column found among {', '.join(columns)}: name it with image=...")
    if not roles["caption"]:
        raise DataError(
            f"no caption column found among {', '.join(columns)}: name it with caption=..."
        )
    return roles


# ---- cells --------------------------------------------------------------------------------------
def _captions_of(value) -> list[str]:
    """A caption cell -> list of strings (lists, JSON lists in a string, or one string)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _captions_of(v)]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return _captions_of(parsed)
    # an empty caption is kept: extraction skips it and lists it, rather than losing it silently
    return [text]


def _scalar(value) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _norm_ref(ref: str) -> str:
    return ref if "://" in ref else Path(ref).as_posix().removeprefix("./")


# ---- listing ----------------------------------------------------------------------------------
def list_table(
    path: str | os.PathLike,
    *,
    image: str | None = None,
    caption: str | list[str] | None = None,
    label: str | None = None,
    id: str | None = None,
    group: str | None = None,
    root: str | os.PathLike | None = None,
    name: str | None = None,
) -> DatasetIndex:
    """List a paired table; rows with the same image (or id) merge into one item.

    >>> idx = list_table("pairs.csv")  # columns: image, caption  # doctest: +SKIP
    >>> idx = list_table("coco.jsonl", image="file_name", caption="captions")  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    table = read_table(path)
    roles = detect_columns(table.column_names, image, caption, label, id, group)
    cols = {
        role: table.column(c).to_pylist() for role, c in roles.items() if role != "caption" and c
    }
    caption_cols = [table.column(c).to_pylist() for c in roles["caption"]]
    items: dict[str, dict] = {}
    dropped = 0
    for i in range(table.num_rows):
        ref = _scalar(cols["image"][i])
        key = _scalar(cols["id"][i]) if "id" in cols else None
        key = key or (_norm_ref(ref) if ref else None)
        if key is None:
            dropped += 1  # neither an image nor an id: nothing to pair
            continue
        item = items.get(key)
        if item is None:
            item = items[key] = {
                "item_id": key,
                "image": _norm_ref(ref) if ref else None,
                "caption": [],
                "label": None,
                "group": None,
            }
        for col in caption_cols:
            item["caption"] += [c for c in _captions_of(col[i]) if c not in item["caption"]]
        for role in ("label", "group"):
            if role in cols and item[role] is None:
                item[role] = _scalar(cols[role][i])
    meta = {"source": str(path), "columns": roles, "rows": table.num_rows, "dropped_rows": dropped}
    base = Path(root).expanduser() if root else path.parent
    return DatasetIndex.from_records(
        name or path.stem,
        list(items.values()),
        {"image": "image", "caption": "text"},
        root=str(base.resolve()),
        meta=meta,
    )
