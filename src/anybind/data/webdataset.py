"""WebDataset tar shards in the img2dataset layout: ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``).

Audio samples (``KEY.wav`` / ``.flac`` / ``.ogg`` / ``.mp3`` + ``KEY.txt``) give an ``audio``
field the same way; a sample may hold an image and an audio file.

Shards are given as a directory (every ``*.tar`` in it), one ``.tar``, a glob, or brace notation
(``shards/{00000..00009}.tar``, ``{a,b}.tar``). Members are listed once per shard
(`tar_members.list_members`: names, offsets, sizes); captions are read with positional reads;
images and audio become ``tar://<shard>#<member>`` references that `images.load_image` and
`audio.load_audio` read the same way.
item_id = ``<shard stem>/<key>``: stable whatever other shards are listed.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
from pathlib import Path

from ..errors import DataError
from .index import DatasetIndex
from .tar_members import list_members, read_member

LISTING_VERSION = 2  # 2: audio samples
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3")
CAPTION_EXTENSIONS = ("txt", "caption", "text")
LABEL_EXTENSIONS = ("cls", "label")


def expand_braces(pattern: str) -> list[str]:
    """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; '{x,y}' lists too; nests."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def resolve_shards(spec: str | os.PathLike) -> list[Path]:
    """Shard paths from a directory, a file, a glob or a brace pattern (sorted, existing)."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*.tar") if p.is_file())
    elif path.is_file():
        shards = [path]
    else:
        shards = []
        for pattern in expand_braces(os.path.expanduser(spec)):
            if glob.has_magic(pattern):
                shards += [Path(p) for p in sorted(glob.glob(pattern))]
            elif Path(pattern).is_file():
                shards.append(Path(pattern))
            elif "{" in spec:
                raise DataError(f"shard {pattern} (from {spec}) does not exist")
    if not shards:
        raise DataError(f"no tar shards found for '{spec}'")
    return sorted({p.resolve() for p in shards})


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the base name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _text(shard: Path, member: str) -> str:
    return read_member(shard, member).decode("utf-8", "replace").strip()


def _shard_records(shard: Path) -> list[dict]:
    samples: dict[str, dict[str, str]] = {}
    for member in list_members(shard):
        key, ext = _split_key(member)
        if key.rpartition("/")[2].startswith("_") or not ext:
            continue  # e.g. __index__ files, or members with no extension
        samples.setdefault(key, {})[ext] = member
    records = []
    for key, parts in samples.items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        audio = next((parts[e] for e in AUDIO_EXTENSIONS if e in parts), None)
        if image is None and audio is None:
            continue
        label = next((_text(shard, parts[e]) for e in LABEL_EXTENSIONS if e in parts), None)
        records.append(
            {
                "item_id": f"{shard.stem}/{key}",
                "image": f"tar://{shard}#{image}" if image else None,
                "audio": f"tar://{shard}#{audio}" if audio else None,
                "caption": _captions(shard, parts),
                "label": label,
            }
        )
    return records


def _captions(shard: Path, parts: dict[str, str]) -> list[str]:
    """A sample's captions: its .txt (.caption, .text) members, then its json's 'caption'."""
    captions = [_text(shard, parts[e]) for e in CAPTION_EXTENSIONS if e in parts]
    if "json" in parts:
        try:
            info = json.loads(read_member(shard, parts["json"]))
        except ValueError:
            info = {}
        extra = info.get("caption") if isinstance(info, dict) else None
        if isinstance(extra, str) and extra.strip():
            captions.append(extra.strip())
    return list(dict.fromkeys(c for c in captions if c))


def list_webdataset(shards: str | os.PathLike, name: str | None = None) -> DatasetIndex:
    """One item per sample key that has an image or an audio file; captions from .txt (and json
    'caption'). Fields: ``image`` and/or ``audio`` (whichever the samples hold), ``caption``.

    >>> idx = list_webdataset("laion/{00000..00009}.tar")  # doctest: +SKIP
    """
    paths = resolve_shards(shards)
    records = [r for shard in paths for r in _shard_records(shard)]
    if not records:
        raise DataError(
            f"the shards of '{shards}' hold no samples with an image ({', '.join(IMAGE_EXTENSIONS)}) "
            f"or audio ({', '.join(AUDIO_EXTENSIONS)})"
        )
    media = [m for m in ("image", "audio") if any(r[m] for r in records)]
    meta = {"source": os.fspath(shards), "shards": [str(p) for p in paths]}
    default_name = Path(os.fspath(shards)).stem.split("{")[0].strip("-_") or "webdataset"
    return DatasetIndex.from_records(
        name or default_name, records, {**{m: m for m in media}, "caption": "text"}, meta=meta
    )
