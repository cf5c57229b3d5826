"""The cascade baseline for speech: Whisper's transcript of a clip, then the text side of the same
bound model. A spoken query bound directly (audio -> bound space) should beat it.

    store = transcript_store(speech_index, test_items, {"spec": "minilm-l6", "layers": "final"})
    # then score ("text", store, 0) as a query set beside the audio (`evaluate.emergent.score_pairs`)

Only the clips asked for are transcribed (rendering 0 of the evaluation items), each once: the
transcripts are cached by the clip's content hash and the transcriber's identity, so a second run,
or another fold holding the same clip, transcribes nothing. The transcripts are listed as a dataset
with the speech dataset's item ids and groups, and extracted by the text encoder into an ordinary
store. A clip Whisper hears nothing in gets the query "(inaudible)": dropping it would hide a miss.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config import cache_root
from ..errors import AnybindError

log = logging.getLogger("anybind.cascade")
INAUDIBLE = "(inaudible)"
TRANSCRIBER = "whisper-tiny-en/greedy/v1"  # part of the cache key: another decoder, other transcripts


def rendering_refs(index, items: set[str], field: str = "audio", rendering: int = 0) -> dict[str, tuple[str, str]]:
    """item -> (resolved clip reference, group) for rendering `rendering` of each item asked for."""
    cols = index.table.select(["item_id", "group", field]).to_pylist()
    out = {}
    for row in cols:
        refs = row[field] if isinstance(row[field], list) else [row[field]]
        if row["item_id"] in items and len(refs) > rendering and refs[rendering]:
            out[row["item_id"]] = (index.resolve(refs[rendering]), row["group"])
    return out


def transcribe_cached(refs: list[str], cache=None, progress: bool = True, batch_size: int = 8) -> list[str]:
    """Whisper tiny.en transcripts of audio files, cached per clip content in ``<cache>/transcripts``."""
    from ..data.audio import load_audio
    from .protocol import ResultsLog

    known = ResultsLog(cache_root(cache) / "transcripts" / "transcripts.jsonl")  # a cut line: transcribed again
    keys = [_clip_key(r) for r in refs]
    todo = [i for i, k in enumerate(keys) if known.get(k) is None]
    if todo:
        from tqdm.auto import tqdm

        from ..encoders.whisper import transcribe

        bar = tqdm(total=len(todo), unit="clip", desc="transcribe (cascade)", disable=not progress)
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            texts = transcribe([load_audio(refs[i]) for i in chunk], batch_size=batch_size)
            for i, text in zip(chunk, texts):
                known.add({"key": keys[i], "text": text})
            bar.update(len(chunk))
        bar.close()
    return [known.get(k)["text"] for k in keys]


def _clip_key(ref: str) -> str:
    return hashlib.sha256(TRANSCRIBER.encode() + b"\0" + Path(ref).read_bytes()).hexdigest()[:24]


def transcript_index(index, items: set[str], cache=None, progress: bool = True, field: str = "audio"):
    """A text dataset of the transcripts of rendering 0 of `items`: same item ids and groups."""
    from ..data.index import DatasetIndex

    refs = rendering_refs(index, items, field)
    if not refs:
        raise AnybindError(f"{index.name} has no '{field}' clip for any of the {len(items)} items to transcribe")
    ids = sorted(refs)
    texts = transcribe_cached([refs[i][0] for i in ids], cache, progress)
    empty = sum(not t.strip() for t in texts)
    if empty:
        log.warning("Whisper heard nothing in %d of %d clips: their query is %r", empty, len(ids), INAUDIBLE)
    records = [{"item_id": i, "caption": [t.strip() or INAUDIBLE], "group": refs[i][1]} for i, t in zip(ids, texts)]
    meta = {"source": index.name, "transcriber": TRANSCRIBER, "inaudible": empty}
    return DatasetIndex.from_records(f"{index.name}-transcripts", records, {"caption": "text"}, meta=meta)


def transcript_store(index, items: set[str], text_entry: dict, cache=None, progress: bool = True,
                     field: str = "audio"):
    """The cascade's query store: transcripts of rendering 0 of `items`, through the text encoder
    entry the bound model's text side was extracted with ({spec, layers, pooling})."""
    from ..features import extract

    tindex = transcript_index(index, items, cache, progress, field)
    return extract(text_entry["spec"], tindex, layers=text_entry.get("layers") or "final",
                   pooling=text_entry.get("pooling"), cache=cache, progress=progress)
