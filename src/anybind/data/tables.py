"""Paired tables (CSV, TSV, JSONL, Parquet): an image and/or audio column plus caption columns.

Column roles are found by common names and can be given explicitly (``image=``, ``audio=``,
``caption=``, ``label=``, ``id=``, ``group=``). A generic file column (``path``, ``file``, ...)
whose values end in an audio extension (`audio.AUDIO_EXTENSIONS`) is the audio column, not the
image one. Several captions per item come from several caption columns,
a caption cell holding a list (JSON/Parquet lists, or a JSON list in a CSV cell), or several
rows naming the same image: they merge into one item. Relative image and audio paths resolve
against the table's folder (``root``). item_id = the id column when there is one, else the
image path, else the audio path.
Text tables are UTF-8 unless ``encoding=`` says otherwise; a byte that does not decode is refused
with its line and column, never read as bytes or replaced.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
from pathlib import Path

import pyarrow as pa

from ..errors import DataError
from .index import DatasetIndex

LISTING_VERSION = 3  # 2: non-UTF-8 bytes refused (a listing cached before may hold b'...' text); 3: audio
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
AUDIO_NAMES = (
    "audio",
    "audio_path",
    "audiopath",
    "audio_file",
    "audio_filename",
    "audio_url",
    "wav",
    "wav_path",
    "wav_file",
    "sound",
    "recording",
)
#: how many of a generic file column's values are looked at to tell audio from images
SNIFF_ROWS = 20
MEDIA = ("image", "audio")  # the file fields a table may have, in the order an item id falls back on
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
#: the tables read as text, so in an encoding (Parquet strings are always UTF-8)
TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json")
CHECK_CHUNK = 8 * 2**20  # bytes checked at a time: any table size in bounded memory


# ---- reading ----------------------------------------------------------------------------------
def read_table(path: str | os.PathLike, encoding: str = "utf-8") -> pa.Table:
    """Read a CSV/TSV/JSONL/JSON/Parquet file into an Arrow table (format from the suffix).

    Text tables are checked to be valid `encoding` first: a byte that is not is refused, named
    by line and column (pyarrow would otherwise read a whole CSV column as bytes, or replace the
    byte in JSONL). Another encoding (``encoding="latin-1"``) is decoded here and read as UTF-8.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        source = _utf8_source(path, suffix, encoding)
        if suffix in (".csv", ".tsv", ".tab"):
            from pyarrow import csv

            parse = csv.ParseOptions(
                delimiter="\t" if suffix != ".csv" else ",", newlines_in_values=True
            )
            convert = csv.ConvertOptions(strings_can_be_null=True)
            return csv.read_csv(source, parse_options=parse, convert_options=convert)
        if suffix in (".jsonl", ".ndjson"):
            from pyarrow import json as pajson

            return pajson.read_json(source)
        if suffix == ".json":
            return _json_table(path, source)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
    except FileNotFoundError as exc:
        raise DataError(f"table not found: {path}") from exc
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise DataError(f"cannot read table {path}: {exc}") from exc
    raise DataError(f"unknown table format '{suffix}' for {path}: use {', '.join(TABLE_SUFFIXES)}")


def _json_table(path: Path, source) -> pa.Table:
    raw = source.getvalue() if isinstance(source, io.BytesIO) else path.read_bytes()
    rows = json.loads(raw.decode("utf-8-sig"))
    if isinstance(rows, dict):  # {"images": [...]} / {"data": [...]}
        rows = next((v for v in rows.values() if isinstance(v, list)), None)
    if not isinstance(rows, list):
        raise DataError(f"{path}: a JSON table must be a list of objects")
    return pa.Table.from_pylist(rows)


def _utf8_source(path: Path, suffix: str, encoding: str):
    """What pyarrow reads: the path of a checked UTF-8 file, or the file decoded from
    `encoding` and re-encoded as UTF-8 (in memory)."""
    try:
        codec = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise DataError(f"unknown encoding {encoding!r} for {path}: use e.g. utf-8, latin-1, cp1252") from None
    if suffix not in TEXT_SUFFIXES:
        if codec != "utf-8" and suffix in TABLE_SUFFIXES:
            raise DataError(f"{path}: Parquet text is always UTF-8; an encoding applies only to "
                            f"{', '.join(TEXT_SUFFIXES)} tables")
        return path
    if codec == "utf-8":
        _check_decodes(path, codec)
        return path
    return io.BytesIO(_decode(path.read_bytes(), codec, path, first_line=1).encode("utf-8"))


def _check_decodes(path: Path, codec: str) -> None:
    """Refuse a file that is not valid `codec` (an ASCII-compatible one), reading it in chunks of
    whole lines: in such an encoding a newline byte is always a newline, never part of a character."""
    line, tail = 1, b""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHECK_CHUNK), b""):
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            piece, tail = data[:cut], data[cut:]
            _decode(piece, codec, path, first_line=line)
            line += piece.count(b"\n")
    _decode(tail, codec, path, first_line=line)


def _decode(data: bytes, codec: str, path: Path, first_line: int) -> str:
    """`data` decoded; a byte that is not `codec` is refused, named by line, column and value."""
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        start = exc.start
        line = first_line + data.count(b"\n", 0, start)
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        hint = ("read it with --encoding latin-1 or the file's own encoding such as cp1252 "
                "(`encoding:` in a run file, encoding= in Python)"
                if codec == "utf-8" else "give the file's own encoding with --encoding")
        raise DataError(f"{path} line {line}: byte 0x{data[start]:02x} at column {column} is not "
                        f"{codec.upper()}: {hint}") from None


# ---- column roles -----------------------------------------------------------------------------
def _find(columns: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _numbered(columns: list[str], names: tuple[str, ...]) -> list[str]:
    """caption_1, caption2, sentence_3 ... (several caption columns)."""
    pat = re.compile(rf"^({'|'.join(names)})[\s_\-]?\d+$", re.IGNORECASE)
    return [c for c in columns if pat.match(c.strip())]


def detect_columns(
    columns: list[str], image=None, caption=None, label=None, id=None, group=None, audio=None, sample=None
) -> dict:
    """{'image': col|None, 'audio': col|None, 'caption': [cols], 'label', 'id', 'group': col|None}.

    Explicit arguments win; `caption` may be one name or a list. `sample` (column -> a few of its
    values) lets a generic file column holding audio files be taken as the audio column. An image
    or an audio column is needed, or both. Unknown names are a DataError that lists the columns.
    """

    def check(col):
        if col is not None and col not in columns:
            raise DataError(f"the table has no column '{col}': it has {', '.join(columns)}")
        return col

    roles = {
        **_media_columns(columns, check(image), check(audio), sample or {}),
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
        dict.fromkeys(c for c in caps if c not in (roles["image"], roles["audio"], roles["id"]))
    )
    if roles["image"] is None and roles["audio"] is None:
        raise DataError(f"no image column (nor audio column) found among {', '.join(columns)}: "
                        "name it with image=... (or audio=...)")
    if not roles["caption"]:
        raise DataError(
            f"no caption column found among {', '.join(columns)}: name it with caption=..."
        )
    return roles


def _media_columns(columns: list[str], image, audio, sample: dict) -> dict:
    """The image and audio columns: named ones, else found by name; a found (not named) image
    column whose sampled values are all audio files is the audio column instead."""
    from .audio import is_audio

    if audio is None:
        audio = _find([c for c in columns if c != image], AUDIO_NAMES)
    if image is None:
        image = _find([c for c in columns if c != audio], IMAGE_NAMES)
        values = [str(v).split("?")[0] for v in sample.get(image, []) if v is not None and str(v).strip()]
        if image is not None and values and all(is_audio(v) for v in values):
            image, audio = None, audio or image
    return {"image": image, "audio": audio}


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


def _merge_rows(table: pa.Table, roles: dict) -> tuple[dict[str, dict], int]:
    """The table's rows as items keyed by id (or image, or audio): rows naming the same one merge;
    returns (items, how many rows named neither an image, an audio file nor an id)."""
    cols = {
        role: table.column(c).to_pylist() for role, c in roles.items() if role != "caption" and c
    }
    caption_cols = [table.column(c).to_pylist() for c in roles["caption"]]
    items: dict[str, dict] = {}
    dropped = 0
    for i in range(table.num_rows):
        refs = {m: _scalar(cols[m][i]) if m in cols else None for m in MEDIA}
        key = _scalar(cols["id"][i]) if "id" in cols else None
        key = key or next((_norm_ref(r) for r in refs.values() if r), None)
        if key is None:
            dropped += 1  # neither a file nor an id: nothing to pair
            continue
        item = items.get(key)
        if item is None:
            item = items[key] = {"item_id": key, "caption": [], "label": None, "group": None}
            item.update({m: _norm_ref(r) if r else None for m, r in refs.items() if m in cols})
        for col in caption_cols:
            item["caption"] += [c for c in _captions_of(col[i]) if c not in item["caption"]]
        for role in ("label", "group"):
            if role in cols and item[role] is None:
                item[role] = _scalar(cols[role][i])
    return items, dropped


# ---- listing ----------------------------------------------------------------------------------
def list_table(
    path: str | os.PathLike,
    *,
    image: str | None = None,
    audio: str | None = None,
    caption: str | list[str] | None = None,
    label: str | None = None,
    id: str | None = None,
    group: str | None = None,
    root: str | os.PathLike | None = None,
    name: str | None = None,
    encoding: str = "utf-8",
) -> DatasetIndex:
    """List a paired table; rows with the same image (or id, or audio file) merge into one item.

    Fields: ``image`` and/or ``audio`` (``audio=`` names an audio column; one is also found by
    name, or as a file column whose values are audio files), then ``caption``.

    `encoding` is the text encoding of a CSV/TSV/JSONL/JSON table (default UTF-8; a byte that
    is not valid is refused, naming its line). As a dataset spec option:
    ``load_dataset("table:pairs.csv", encoding="latin-1")`` (the CLI's ``--encoding``).

    >>> idx = list_table("pairs.csv")  # columns: image, caption  # doctest: +SKIP
    >>> idx = list_table("coco.jsonl", image="file_name", caption="captions")  # doctest: +SKIP
    >>> list_table("clips.csv").fields  # columns: path (x.wav), text  # doctest: +SKIP
    {'audio': 'audio', 'caption': 'text'}
    """
    path = Path(path).expanduser()
    table = read_table(path, encoding)
    sample = {c: table.column(c).slice(0, SNIFF_ROWS).to_pylist() for c in table.column_names}
    roles = detect_columns(table.column_names, image, caption, label, id, group, audio, sample)
    items, dropped = _merge_rows(table, roles)
    meta = {"source": str(path), "columns": roles, "rows": table.num_rows, "dropped_rows": dropped}
    if encoding != "utf-8":
        meta["encoding"] = encoding
    base = Path(root).expanduser() if root else path.parent
    return DatasetIndex.from_records(
        name or path.stem,
        list(items.values()),
        {**{m: m for m in MEDIA if roles[m]}, "caption": "text"},
        root=str(base.resolve()),
        meta=meta,
    )
