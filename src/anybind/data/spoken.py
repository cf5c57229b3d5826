"""Built-in spoken datasets: captions read aloud by espeak-ng, so audio has real paired data offline.

- ``openclipart-speech``: each openclipart item's first caption, spoken. Same item ids, groups,
  splits and folds as ``openclipart`` (copied from its index), so an audio store lines up with
  the image and caption stores item for item and no item changes side between the datasets.
- ``wordnet-speech``: WordNet noun glosses (Debian `wordnet-base`), spoken; item = synset
  (``n<offset>``, the ImageNet wnid form), label = its lexicographer file ("animal"). No item is
  shared with openclipart.

Fields: ``audio`` (a list of WAV references per item) and ``caption`` (a list with the one text
that was spoken). Rendering 0 (`RENDERINGS`) is one standard voice for every item and always
sits at index 0 of the audio list, the query in evaluation; items whose split is train get two
more renderings (another accent, a faster rate) as training variety. Long captions are cut to
`MAX_WORDS` words and the caption stores exactly what was spoken.

Synthesis: ``espeak-ng -v VOICE -s SPEED -w out.wav`` (text on stdin, so no text is read as an
option), one WAV per (text, rendering) under ``<cache root>/speech/espeak-ng-<version>/``, named
by the hash of (voice, speed, text): an existing file is that very clip (resumable, and a new
espeak version writes a new folder). Each write is atomic; `WORKERS` espeak processes run at a
time. espeak-ng's output is byte-stable (checked by the tests: same text, same bytes).
``NAME:N`` (``openclipart-speech:500``) lists a spread subset of N items.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..config import cache_root
from ..errors import DataError
from .index import DatasetIndex, split_of
from .openclipart import LISTING_VERSION as _OPENCLIPART_VERSION

# a new openclipart listing (captions, groups) must re-list openclipart-speech too, even when
# its cache is keyed by no source file (``openclipart-speech:N``)
LISTING_VERSION = f"1+openclipart.{_OPENCLIPART_VERSION}"
WORKERS = 2  # espeak processes at a time (threads only wait on them)
MAX_WORDS = 25
WORDNET_ROOT = "/usr/share/wordnet"
WORDNET_SIZE = 3000
WORDNET_MIN_WORDS = 3  # shorter glosses ("a dog") say too little to retrieve by
FIELDS = {"audio": "audio", "caption": "text"}
ESPEAK_TIMEOUT_S = 60
# the noun lexicographer files of WordNet 3.0 (lexnames(5WN)): the label of a synset
NOUN_LEXNAMES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
    16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
    22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}


@dataclass(frozen=True)
class Rendering:
    voice: str
    speed: int  # words per minute

    @property
    def folder(self) -> str:
        return f"{self.voice}-s{self.speed}"


#: rendering 0: the standard voice every item gets (the evaluation query); 1, 2: train items only
RENDERINGS = (Rendering("en-us", 175), Rendering("en-gb", 160), Rendering("en-us", 230))


# ---- text ---------------------------------------------------------------------------------------
def spoken_text(text: str | None, max_words: int = MAX_WORDS) -> str:
    """What is spoken for a caption: its first `max_words` words, whitespace normalised."""
    words = (text or "").split()[:max_words]
    return " ".join(words).rstrip(",;:-") if words else ""


def renderings_for(split: str) -> tuple[int, ...]:
    """The renderings an item gets: all for train items, the standard one otherwise."""
    return tuple(range(len(RENDERINGS))) if split == "train" else (0,)


# ---- espeak-ng ----------------------------------------------------------------------------------
def espeak_exe() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("spoken datasets need the espeak-ng program, which is not installed: "
                        "apt-get install espeak-ng (Debian/Ubuntu package 'espeak-ng')")
    return exe


@functools.lru_cache(maxsize=4)
def espeak_version(exe: str) -> str:
    """'1.51' from 'eSpeak NG text-to-speech: 1.51  Data at: ...' (keys the clip folder)."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=ESPEAK_TIMEOUT_S)
    m = re.search(r"text-to-speech:\s*([\w.\-]+)", out.stdout)
    return m.group(1) if m else "unknown"


def speech_root(audio_dir: str | os.PathLike | None = None, exe: str | None = None) -> Path:
    """Where clips live: `audio_dir`, else <cache root>/speech/espeak-ng-<version>."""
    if audio_dir:
        return Path(audio_dir).expanduser()
    return cache_root() / "speech" / f"espeak-ng-{espeak_version(exe or espeak_exe())}"


def clip_ref(text: str, rendering: Rendering) -> str:
    """The clip's path under the speech root, named by what it is (voice, speed, text)."""
    digest = hashlib.sha256(f"{rendering.voice}|{rendering.speed}|{text}".encode()).hexdigest()[:24]
    return f"{rendering.folder}/{digest[:2]}/{digest}.wav"


def synthesize(text: str, rendering: Rendering, path: str | os.PathLike, exe: str | None = None) -> Path:
    """Speak `text` into the WAV `path` (atomically); DataError with espeak's message on failure."""
    exe = exe or espeak_exe()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_with(path, lambda tmp: _espeak(exe, rendering, text, tmp))


def _espeak(exe: str, rendering: Rendering, text: str, out: Path) -> None:
    cmd = [exe, "-v", rendering.voice, "-s", str(rendering.speed), "-w", str(out), "--stdin"]
    try:
        done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=ESPEAK_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"espeak-ng took over {ESPEAK_TIMEOUT_S} s on {text[:60]!r}") from exc
    if done.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:  # 44: a bare WAV header
        why = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}, no audio"
        raise DataError(f"espeak-ng failed on {text[:60]!r} ({rendering.folder}): {why}")


def synthesize_all(jobs: list[tuple[str, Rendering, Path]], exe: str, desc: str = "speech") -> dict[Path, str]:
    """Write every missing clip, `WORKERS` at a time, with a progress bar; {path: reason} of failures."""
    from tqdm.auto import tqdm

    todo = list(dict.fromkeys((t, r, p) for t, r, p in jobs if not p.is_file()))
    failed: dict[Path, str] = {}
    if not todo:
        return failed
    for folder in {p.parent for _, _, p in todo}:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale_tmp(folder)

    def one(job):
        text, rendering, path = job
        try:
            atomic.write_with(path, lambda tmp: _espeak(exe, rendering, text, tmp))
        except DataError as exc:
            return path, str(exc)
        return path, None

    with ThreadPoolExecutor(WORKERS) as pool, tqdm(total=len(todo), desc=desc, unit="clip", disable=None) as bar:
        for path, why in pool.map(one, todo):
            if why:
                failed[path] = why
            bar.update()
    return failed


# ---- building an index --------------------------------------------------------------------------
def spoken_index(name: str, items: list[dict], audio_dir, meta: dict) -> DatasetIndex:
    """Synthesise the clips of `items` (item_id, text, label, group, split) and index them."""
    exe = espeak_exe()
    root = speech_root(audio_dir, exe)
    plans = [(item, [clip_ref(item["text"], RENDERINGS[r]) for r in renderings_for(item["split"])]
              if item["text"] else []) for item in items]
    jobs = [(item["text"], RENDERINGS[int(i)], root / ref) for item, refs in plans
            for i, ref in zip(renderings_for(item["split"]), refs)]
    failed = synthesize_all(jobs, exe, desc=name)
    records = [_record(item, refs, root, failed) for item, refs in plans]
    meta = {**meta, "renderings": [r.folder for r in RENDERINGS], "espeak_ng": espeak_version(exe),
            "clips": len(jobs) - len(failed), "failed": sorted(f"{p.relative_to(root)}: {w}" for p, w in failed.items())}
    # DatasetIndex.from_records types only text fields as lists: build both fields as lists, then
    # name the audio one's modality (its values are WAV references, resolved against `root`)
    index = DatasetIndex.from_records(name, records, {"audio": "text", "caption": "text"}, root=str(root), meta=meta)
    index.fields = dict(FIELDS)
    return index


def _record(item: dict, refs: list[str], root: Path, failed: dict) -> dict:
    """An item's record; a failed rendering 0 drops all of its audio (index 0 is the query)."""
    ok = [ref for ref in refs if root / ref not in failed]
    if refs and refs[0] not in ok:
        ok = []
    return {"item_id": item["item_id"], "audio": ok, "caption": [item["text"]] if item["text"] else [],
            "label": item.get("label"), "group": item["group"], "split": item["split"]}


def spread_rows(total: int, n: int | None) -> list[int]:
    """n row positions evenly spread over `total` (all when n is None), the very rows
    `DatasetIndex.spread` takes: ``openclipart-speech:N`` is ``openclipart``'s ``spread(N)``."""
    import numpy as np

    if n is None or n >= total:
        return list(range(total))
    return np.unique(np.linspace(0, total - 1, num=n).round().astype(np.int64)).tolist()


def _count(value, name: str, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise DataError(f"{name}: {what} must be a positive whole number, not {value!r}")
    return int(value)


def _root_or_count(root, count, name: str, what: str):
    """``NAME:N`` arrives as root='N': a number that is no existing folder is the count."""
    if root is not None and str(root).strip().isdigit() and not Path(str(root)).exists():
        return None, _count(root, name, what)
    return root, _count(count, name, what)


# ---- openclipart-speech -------------------------------------------------------------------------
def list_openclipart_speech(root: str | os.PathLike | None = None, limit: int | None = None,
                            audio_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """openclipart's first captions, spoken; `limit` keeps an evenly spread subset of the items.

    `root` is openclipart's folder (as for ``openclipart``); `audio_dir` where clips are written.

    >>> idx = list_openclipart_speech(limit=200)  # doctest: +SKIP
    """
    from . import load_dataset

    root, limit = _root_or_count(root, limit, "openclipart-speech", "limit")
    espeak_exe()  # refuse before listing openclipart when espeak-ng is missing
    source = load_dataset("openclipart", **({"root": str(root)} if root else {}))
    ids, captions = source.item_ids, source.column("caption")
    labels, groups, splits = source.column("label"), source.column("group"), source.column("split")
    items = [{"item_id": ids[i], "text": spoken_text(captions[i][0] if captions[i] else ""), "label": labels[i],
              "group": groups[i], "split": splits[i]} for i in spread_rows(len(ids), limit)]
    meta = {"source": "openclipart", "openclipart_root": source.meta.get("source"), "limit": limit,
            "licence": "public domain (Open Clip Art Library); speech by espeak-ng (GPL-3.0 program)"}
    return spoken_index("openclipart-speech" + (f"-{limit}" if limit else ""), items, audio_dir, meta)


# ---- wordnet-speech -----------------------------------------------------------------------------
def first_sentence(gloss: str) -> str:
    """A WordNet gloss without its examples: the text before the first ';' (examples follow it)."""
    return " ".join(gloss.split(";", 1)[0].split()).strip()


def read_noun_glosses(path: str | os.PathLike) -> list[dict]:
    """Every noun synset of a WordNet ``data.noun``: item_id (n<offset>), label, words, gloss."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"WordNet noun data not found at {path}: apt-get install wordnet-base "
                        "(Debian/Ubuntu package 'wordnet-base')")
    st = path.stat()
    return [dict(s) for s in _noun_glosses(str(path.resolve()), st.st_mtime_ns, st.st_size)]


@functools.lru_cache(maxsize=2)
def _noun_glosses(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    """Parsed once per process per file version (82,115 synsets: ~1 s)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            head, _, gloss = line.partition("|")
            parts = head.split()
            words = [w.replace("_", " ") for w in parts[4:4 + 2 * int(parts[3], 16):2]]
            out.append({"item_id": f"n{parts[0]}", "label": NOUN_LEXNAMES.get(int(parts[1]), parts[1]),
                        "words": words, "gloss": first_sentence(gloss)})
    return tuple(out)


def list_wordnet_speech(root: str | os.PathLike | None = None, size: int | None = WORDNET_SIZE,
                        audio_dir: str | os.PathLike | None = None) -> DatasetIndex:
    """An evenly spread subset of `size` WordNet noun glosses, spoken; item = synset.

    `root` is the WordNet folder holding ``data.noun`` (default /usr/share/wordnet).

    >>> idx = list_wordnet_speech(size=300)  # doctest: +SKIP
    """
    root, count = _root_or_count(root, size, "wordnet-speech", "size")
    espeak_exe()
    synsets, seen = [], set()
    for s in read_noun_glosses(Path(root or WORDNET_ROOT) / "data.noun"):
        text = spoken_text(s["gloss"])
        if len(text.split()) >= WORDNET_MIN_WORDS and text not in seen:  # one synset per spoken text
            seen.add(text)
            synsets.append({**s, "text": text, "group": s["item_id"], "split": split_of(s["item_id"])})
    items = [synsets[i] for i in spread_rows(len(synsets), count)]
    meta = {"source": str(Path(root or WORDNET_ROOT) / "data.noun"), "size": count, "synsets": len(synsets),
            "licence": "WordNet 3.0 licence (Princeton, permissive); speech by espeak-ng (GPL-3.0 program)"}
    return spoken_index("wordnet-speech" + (f"-{count}" if count else ""), items, audio_dir, meta)


__all__ = ["RENDERINGS", "Rendering", "clip_ref", "list_openclipart_speech", "list_wordnet_speech",
           "read_noun_glosses", "renderings_for", "speech_root", "spoken_text", "synthesize"]
