"""Captions and grouping keys for openclipart, from noisy SVG metadata and file names.

Measured on the Debian set (8,121 images): only ~2,800 distinct titles. A title shared by many
images names a collection ("gramastar" x1,375, "Part of the Flat Icon Collection (...)" x950,
"Lemon SVG theme" x431, "card" x226), not the picture. So:

- a title is a *collection title* when at least `COLLECTION_MIN` images share it and their
  file names say different things; for those images the caption comes from the file name;
- file names are ``<title>_<author>`` cut at 24 characters, plus ``_NN`` (or ``_``): the author
  (whole or cut short), variant letters and numbers are stripped, e.g.
  ``medicina_dottore_archite_01`` -> "medicina dottore", ``bullet_hole_linda_kim_ad`` -> "bullet hole";
- a few series have their own grammar: ``star_57pt08step`` -> "star with 57 points",
  ``bordered_h_q`` -> "queen of hearts playing card";
- keywords (``dc:subject``) are appended, minus tagging noise ("hash", "unsorted", theme tags);
- the description becomes a second caption when it is specific (not shared, not an e-mail).

Grouping keys (see `groups.group_by_keys`): the built caption, the collection title (dates and
numbers removed, so the Flat Icon parts are one collection), the description when shared, the
file-name series (stem without digits, per folder), icon-theme folders, and identical bytes.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

COLLECTION_MIN = 5  # images sharing a title before it may be a collection title
TRUNCATED_AT = 23  # file stems this long were cut: their last author token may be partial
AUTHOR_ALIASES = {"ganson"}  # signatures in file names that are not the dc:creator name
ABBREVIATIONS = {"bw": "black and white", "fldr": "folder", "trsh": "trash", "btn": "button"}
NOISE_KEYWORDS = {
    "",
    "hash",
    "unsorted",
    "clipart",
    "clip art",
    "image",
    "media",
    "svg",
    "png",
    "public domain",
    "externalsource",
    "remix",
    "icons",
    "icon",
}
SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king"}


@dataclass
class ClipartMeta:
    """What one SVG says about its picture, plus where the PNG lies."""

    item_id: str  # relative png path without extension, e.g. "animals/birds/owl_01"
    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""
    digest: str = ""  # hash of the PNG bytes: identical copies in several folders

    @property
    def folder(self) -> str:
        return self.item_id.rpartition("/")[0]

    @property
    def stem(self) -> str:
        return self.item_id.rpartition("/")[2]


def fold(text: str) -> str:
    """Lower-case ASCII (accents dropped): file names and creators are compared folded."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", fold(text)) if t]


def is_slug(text: str) -> bool:
    """A title that is really a file name ('clip_of_new_file', 'boat1', 'balloons-aj')."""
    return " " not in text.strip() and bool(re.search(r"[_\-]|\d$", text))


# ---- file names -------------------------------------------------------------------------------
def _is_variant(tok: str) -> bool:
    return bool(re.fullmatch(r"\d+[a-z]?|[a-z]|v\d+", tok))


def _author_tail(tail: list[str], author: list[str], partial_last: bool) -> bool:
    """Does `tail` spell consecutive author tokens (the last one possibly cut short)?"""
    for j in range(len(author) - len(tail) + 1):
        ok = all(t == a for t, a in zip(tail[:-1], author[j : j + len(tail) - 1], strict=True))
        last, want = tail[-1], author[j + len(tail) - 1]
        if ok and (last == want or (partial_last and want.startswith(last))):
            return True
    return False


def strip_author(toks: list[str], creator: str, truncated: bool) -> list[str]:
    """Remove a trailing author signature (full, cut at 24 characters, initials or an alias)."""
    author = tokens(creator)
    initials = "".join(a[0] for a in author) if len(author) >= 2 else None
    for cut in (0, 1):  # also try once more after dropping a trailing variant like '_ad'
        core = toks[: len(toks) - cut] if cut else toks
        if cut and (len(toks) < 3 or len(toks[-1]) > 2):
            break
        if len(core) >= 2 and (core[-1] in AUTHOR_ALIASES or core[-1] == initials):
            return core[:-1]
        for i in range(1, len(core)):
            if author and _author_tail(core[i:], author, partial_last=truncated and not cut):
                return core[:i]
    return toks


def _special_series(stem: str, folder: str) -> str | None:
    m = re.fullmatch(r"star_(\d+)pt(\d+)step", stem)
    if m:
        return f"star with {int(m.group(1))} points"
    if "/cards" in f"/{folder}":
        m = re.fullmatch(r"([a-z]+)_([cdhs])_(10|[2-9]|[ajqk])", stem)
        if m:
            rank = RANKS.get(m.group(3), m.group(3))
            return f"{rank} of {SUITS[m.group(2)]} playing card, {m.group(1)} deck"
        m = re.fullmatch(r"([a-z]+)_jk_([br])", stem)
        if m:
            return (
                f"{'black' if m.group(2) == 'b' else 'red'} joker playing card, {m.group(1)} deck"
            )
        if re.fullmatch(r"back\d+", stem):
            return "back of a playing card"
    return None


def file_words(stem: str, creator: str, folder: str = "") -> str:
    """The words a file name says about its picture, author and numbering removed."""
    special = _special_series(stem.lower(), folder)
    if special:
        return special
    stem = re.sub(r"^clip_?art_by_.*?_-_", "", stem, flags=re.IGNORECASE)
    stem = re.sub(r"([a-z])([A-Z])", r"\1_\2", stem)  # CamelCase -> words
    core = re.sub(r"(_\d+[a-z]?|_)$", "", stem)
    toks = tokens(stem)
    while toks and _is_variant(toks[-1]):
        toks.pop()
    toks = strip_author(toks, creator, truncated=len(core) >= TRUNCATED_AT)
    words = []
    for tok in toks:
        if any(c.isdigit() for c in tok):
            tok = re.sub(r"\d+", "", tok)
            if len(tok) < 3:
                continue
        words.append(ABBREVIATIONS.get(tok, tok))
    return " ".join(words)


# ---- titles, descriptions, keywords ----------------------------------------------------------
def clean_title(title: str, creator: str) -> str:
    """'Clipart by Nicu Buculei - smiley111' -> 'smiley'; slug titles become words."""
    title = re.sub(r"\s+", " ", title).strip()
    title = re.sub(r"^clip ?art by .*? - ", "", title, flags=re.IGNORECASE)
    if is_slug(title):
        return file_words(title, creator)
    return title


def collection_key(title: str) -> str:
    """Titles of one collection differ only by dates and numbers in brackets."""
    t = re.sub(r"\(.*?\)", " ", fold(title))
    return " ".join(re.sub(r"\d+", " ", t).split())


def clean_keywords(keywords: list[str], creator: str = "") -> list[str]:
    """Keywords minus tagging noise and the author's own name."""
    author = set(tokens(creator))
    out: list[str] = []
    for kw in keywords:
        kw = " ".join(re.split(r"[_\s]+", kw.strip().lower())).strip()
        if kw in NOISE_KEYWORDS or "theme" in kw or "@" in kw or len(kw) < 2 or kw in out:
            continue
        if author and set(tokens(kw)) <= author:
            continue
        out.append(kw)
    return out


def _stem_word(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


PROVENANCE = re.compile(
    r"^(derivative|derived|based on|converted|traced|made (with|in)|created (with|in)|drawn (with|in)|"
    r"remix|part of|from |see |public domain)",
    re.IGNORECASE,
)


def _is_specific_description(desc: str, shared: int, caption: str) -> bool:
    """A description worth a second caption: unique, a few words, about the picture."""
    d = desc.strip()
    if shared > 1 or len(d.split()) < 2 or "@" in d or re.search(r"https?://|www\.", d):
        return False
    if PROVENANCE.match(d):
        return False
    return " ".join(tokens(d)) not in " ".join(tokens(caption))


def theme_of(folder: str) -> str | None:
    """The icon-theme folder an item lies in ('lemon-theme'), if any."""
    return next((p for p in folder.split("/") if p.endswith("theme")), None)


# ---- the builder -------------------------------------------------------------------------------
class CaptionBuilder:
    """Fitted on the whole set (title and description frequencies), then builds per item."""

    def __init__(self, metas: list[ClipartMeta]):
        self.desc_count = Counter(
            " ".join(m.description.split()) for m in metas if m.description.strip()
        )
        count: Counter[str] = Counter()
        words_by_key: dict[str, set[str]] = defaultdict(set)
        for m in metas:
            key = collection_key(m.title)
            count[key] += 1
            words_by_key[key].add(file_words(m.stem, m.creator, m.folder))
        self.collections = {
            k for k, n in count.items() if k and n >= COLLECTION_MIN and len(words_by_key[k]) > 1
        }

    def is_collection(self, title: str) -> bool:
        """Shared by many images whose file names differ ('Part of the Flat Icon Collection (...)')."""
        return collection_key(title) in self.collections

    def main_text(self, m: ClipartMeta) -> str:
        """The specific title, else the file name's words, else the folder's words.

        Icons of a theme folder say so ("home icon, lemon theme"): the same name in two
        themes is two different drawings, and their captions should differ too.
        """
        title = m.title.strip()
        text = ""
        if title and not self.is_collection(title):
            text = clean_title(title, m.creator)
        if not text:
            text = file_words(m.stem, m.creator, m.folder)
            if text and collection_key(title).startswith(text):  # a file named after its collection
                text = ""
        text = text or " ".join(tokens(m.folder.replace("/", " ")))
        theme = theme_of(m.folder)
        if theme:
            text = f"{text} icon, {' '.join(tokens(theme.removesuffix('theme'))) or theme} theme"
        return text

    def captions(self, m: ClipartMeta) -> list[str]:
        main = self.main_text(m)
        seen = {_stem_word(w) for w in tokens(main)}
        extra = [
            k
            for k in clean_keywords(m.keywords, m.creator)
            if not {_stem_word(w) for w in tokens(k)} <= seen
        ]
        caption = ", ".join([main, *extra]) if extra else main
        out = [caption]
        desc = " ".join(m.description.split())
        if desc and _is_specific_description(desc, self.desc_count[desc], caption):
            out.append(desc)
        return out

    def group_keys(self, m: ClipartMeta, caption: str) -> list[str]:
        keys = [f"caption:{fold(caption)}"]
        title = m.title.strip()
        if self.is_collection(title):
            keys.append(f"title:{collection_key(title)}")
        desc = " ".join(m.description.split())
        if desc and self.desc_count[desc] >= 2 and "@" not in desc:
            keys.append(f"desc:{fold(desc)}")
        series = re.sub(r"[\d_\-]+", "_", fold(m.stem)).strip("_")
        series = re.sub(r"(_[a-z]{1,2})+$", "", series)  # variant letters: _r, _ad, _a
        if len(re.sub(r"[^a-z]", "", series)) >= 3:
            keys.append(f"series:{m.folder}/{series}")
        theme = theme_of(m.folder)
        if theme:
            keys.append(f"theme:{theme}")
        if m.digest:
            keys.append(f"bytes:{m.digest}")
        return keys
