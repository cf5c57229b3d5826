"""Built-in dataset: openclipart (Debian `openclipart-png` + `openclipart-svg`), public domain.

8,121 clip-art PNGs under ``png/<category>/...``; the SVG at the same relative path holds the
metadata (``dc:title``, ``dc:description``, keywords in ``dc:subject/rdf:Bag/rdf:li``,
``dc:creator``). Captions and groups are built by `openclipart_text` (raw titles are mostly
collection names). label = the top-level category ("animals"); the sub-path is in the item id
("animals/birds/owl_01", the PNG path without extension).
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from pathlib import Path

from ..errors import DataError
from .groups import group_by_keys, group_stats, oversized_groups
from .index import DatasetIndex
from .near_duplicates import THRESHOLD, look_keys, thumbnails
from .openclipart_text import CaptionBuilder, ClipartMeta

DEFAULT_ROOT = "/usr/share/openclipart"
LISTING_VERSION = 2  # 2: near-duplicates by look join groups
_HEAD = 1 << 16  # the metadata block sits at the top of every file in the set (checked)

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_CREATOR = re.compile(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", re.S)


def _text(m: re.Match | None) -> str:
    return html.unescape(m.group(1)).strip() if m else ""


def read_svg_meta(svg_path: str | os.PathLike, item_id: str) -> ClipartMeta:
    """Metadata of one SVG (title, description, keywords, creator); empty fields when absent."""
    meta = ClipartMeta(item_id=item_id)
    try:
        with open(svg_path, "rb") as f:
            head = f.read(_HEAD)
            if b"</cc:Work>" not in head and b"<cc:Work" in head:
                head += f.read()
    except OSError:
        return meta
    work = _WORK.search(head.decode("utf-8", "replace"))
    if not work:
        return meta
    block = work.group(0)
    own = re.split(r"<dc:(?:publisher|creator|rights)>", block, maxsplit=1)[0]
    meta.title = _text(_TITLE.search(own))
    meta.description = _text(_DESC.search(block))
    subject = _SUBJECT.search(block)
    meta.keywords = (
        [html.unescape(k).strip() for k in _LI.findall(subject.group(1))] if subject else []
    )
    meta.creator = _text(_CREATOR.search(block))
    return meta


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()


def list_openclipart(
    root: str | os.PathLike | None = None, max_group_share: float = 0.025, by_look: bool = True
) -> DatasetIndex:
    """List openclipart: one item per PNG, captions from its SVG, groups by collection, series
    and look (near-identical thumbnails, see `near_duplicates`; ``by_look=False`` skips that).

    Groups over `max_group_share` of the items (the star set, the big icon themes, the card
    decks) go to train rather than by hash: in val or test they would be most of the split.

    >>> idx = list_openclipart()  # doctest: +SKIP
    >>> idx.summary()["items"]  # doctest: +SKIP
    8121
    """
    root = Path(root or DEFAULT_ROOT)
    png_root = root / "png"
    pngs = _pngs(png_root)
    metas = _read_metas(pngs, png_root, root / "svg")
    builder = CaptionBuilder(metas)
    captions = [builder.captions(m) for m in metas]
    keys = [builder.group_keys(m, c[0]) for m, c in zip(metas, captions, strict=True)]
    looks = look_keys(thumbnails(pngs)) if by_look else [None] * len(pngs)
    for item_keys, look in zip(keys, looks, strict=True):
        if look:
            item_keys.append(look)
    groups = group_by_keys([m.item_id for m in metas], keys)
    to_train = oversized_groups(groups, max_group_share)
    records = [
        {
            "item_id": m.item_id,
            "image": f"{m.item_id}.png",
            "caption": caps,
            "label": m.item_id.split("/", 1)[0],
            "group": g,
            "split": "train" if g in to_train else None,
        }
        for m, caps, g in zip(metas, captions, groups, strict=True)
    ]
    meta = _listing_meta(root, metas, builder, groups, to_train, max_group_share, looks if by_look else None)
    return DatasetIndex.from_records(
        "openclipart", records, {"image": "image", "caption": "text"}, root=str(png_root), meta=meta
    )


def _pngs(png_root: Path) -> list[Path]:
    if not png_root.is_dir():
        raise DataError(
            f"openclipart PNGs not found under {png_root}: apt-get install openclipart-png openclipart-svg"
        )
    pngs = sorted(p for p in png_root.rglob("*.png") if p.is_file())
    if not pngs:
        raise DataError(f"no PNG files under {png_root}")
    return pngs


def _read_metas(pngs: list[Path], png_root: Path, svg_root: Path) -> list[ClipartMeta]:
    """Each PNG's SVG metadata (at the same relative path) and the digest of its bytes."""
    metas = []
    for p in pngs:
        rel = p.relative_to(png_root).with_suffix("").as_posix()
        meta = read_svg_meta(svg_root / f"{rel}.svg", rel)
        meta.digest = _digest(p)
        metas.append(meta)
    return metas


def _listing_meta(root: Path, metas: list[ClipartMeta], builder: CaptionBuilder, groups: list,
                  to_train, max_group_share: float, looks: list | None) -> dict:
    """What the index records about how it was listed (sources, groups, near-duplicates)."""
    stats = group_stats(groups, top=5)
    return {
        "source": str(root),
        "licence": "public domain (Open Clip Art Library)",
        "with_svg_metadata": sum(1 for m in metas if m.title or m.keywords),
        "collection_titles": len(builder.collections),
        "groups": stats["groups"],
        "largest_groups": stats["largest"],
        "groups_sent_to_train": sorted(to_train),
        "max_group_share": max_group_share,
        "near_duplicates_by_look": {"blank": looks.count("look:blank"),
                                    "in_look_groups": sum(1 for k in looks if k and k != "look:blank"),
                                    "threshold": THRESHOLD} if looks is not None else None,
    }
