"""The cascade baseline: Whisper transcripts of spoken clips, cached per clip, as a text store."""

import json
import subprocess

import pytest

from anybind.data.index import DatasetIndex
from anybind.evaluate.cascade import INAUDIBLE, transcript_index, transcript_store

pytestmark = pytest.mark.slow
TEXTS = {"a": "a red car on the road", "b": "a small blue bird", "c": "three green apples"}


@pytest.fixture()
def speech_index(tmp_path):
    records = []
    for item, text in TEXTS.items():
        path = tmp_path / f"{item}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        records.append({"item_id": item, "audio": [f"{item}.wav"], "caption": [text], "group": f"g-{item}"})
    # a silent clip: Whisper hears nothing, and the query says so instead of vanishing
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype=np.float32) + 1e-3 * np.sin(np.arange(16000)), 16000)
    records.append({"item_id": "quiet", "audio": ["quiet.wav"], "caption": ["nothing"], "group": "g-quiet"})
    return DatasetIndex.from_records("tiny-speech", records, {"audio": "audio", "caption": "text"}, root=str(tmp_path))


def test_transcripts_are_cached_and_keep_ids_and_groups(speech_index, cache):
    index = transcript_index(speech_index, {"a", "b", "c", "quiet"}, progress=False)
    rows = {r["item_id"]: r for r in index.table.to_pylist()}
    assert set(rows) == {"a", "b", "c", "quiet"} and rows["b"]["group"] == "g-b"
    # espeak is robotic and Whisper tiny.en small: most content words come back, not all
    words = [w for t in TEXTS.values() for w in t.split() if w not in ("a", "on", "the")]
    heard = " ".join(rows[i]["caption"][0].lower() for i in TEXTS)
    assert sum(w in heard for w in words) >= len(words) / 2, heard
    log = cache / "transcripts" / "transcripts.jsonl"
    assert len(log.read_text().splitlines()) == 4
    again = transcript_index(speech_index, {"a", "b", "c", "quiet"}, progress=False)
    assert again.table.equals(index.table) and len(log.read_text().splitlines()) == 4  # nothing transcribed twice
    assert rows["quiet"]["caption"][0].strip() != "" and (rows["quiet"]["caption"][0] == INAUDIBLE
                                                          or json.dumps(rows["quiet"]))


def test_transcript_store_is_a_text_store_of_the_items(speech_index, cache):
    store = transcript_store(speech_index, {"a", "c"}, {"spec": "random:text", "layers": "final"}, progress=False)
    assert sorted(store.item_ids) == ["a", "c"] and store.key["dataset"] == "tiny-speech-transcripts"
